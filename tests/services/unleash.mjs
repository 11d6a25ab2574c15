// Runs a real Unleash server (npm `unleash-server`) on loopback for the test suite.
//
//   node unleash.mjs --port PORT --database-url postgres://USER[:PASSWORD]@HOST:PORT/DB
//
// API tokens come from INIT_ADMIN_API_TOKENS and INIT_BACKEND_API_TOKENS in the
// environment (authentication type `open-source`). The server talks to nothing but the
// given PostgreSQL: no version check, no telemetry. SIGTERM or SIGINT stops it cleanly
// (exit 0), and so does the death of the process that started it, so that a killed test
// run never leaves an Unleash server behind.
import process from 'node:process';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
    options: {
        port: { type: 'string' },
        'database-url': { type: 'string' },
    },
});
const port = Number.parseInt(values.port ?? '', 10);
if (!Number.isInteger(port) || port <= 0 || port > 65535 || !values['database-url']) {
    console.error('usage: node unleash.mjs --port PORT --database-url postgres://user@host:port/db');
    process.exit(2);
}
const database = new URL(values['database-url']);

// unleash-server reads these when its modules are first evaluated, so they are set
// before the dynamic import below; passing `telemetry: false` as an option is ignored.
process.env.CHECK_VERSION = 'false';
process.env.SEND_TELEMETRY = 'false';

const { start } = await import('unleash-server');

let unleash;
let stopping = false;

async function shutdown(reason) {
    if (stopping) {
        return;
    }
    stopping = true;
    console.error(`unleash.mjs: stopping (${reason})`);
    try {
        // Before `start` resolves there is nothing to drain: the database is throwaway.
        if (unleash) {
            await unleash.stop();
        }
    } catch (error) {
        console.error('unleash.mjs: error while stopping', error);
        process.exit(1);
    }
    process.exit(0);
}

process.on('SIGTERM', () => void shutdown('SIGTERM'));
process.on('SIGINT', () => void shutdown('SIGINT'));

// Orphaned (the starting shell was killed with SIGKILL): the parent pid changes.
const parentPid = process.ppid;
setInterval(() => {
    if (process.ppid !== parentPid) {
        void shutdown('parent process exited');
    }
}, 1000).unref();

try {
    unleash = await start({
        db: {
            host: database.hostname,
            port: Number.parseInt(database.port || '5432', 10),
            user: decodeURIComponent(database.username),
            password: decodeURIComponent(database.password),
            database: database.pathname.replace(/^\//, '') || 'unleash',
            ssl: false,
        },
        server: { host: '127.0.0.1', port },
        authentication: { type: 'open-source', enableApiToken: true },
        versionCheck: { enable: false },
        logLevel: process.env.LOG_LEVEL ?? 'warn',
    });
} catch (error) {
    console.error('unleash.mjs: Unleash failed to start', error);
    process.exit(1);
}
console.error(`unleash.mjs: Unleash ${unleash.version} listening on http://127.0.0.1:${port}`);
