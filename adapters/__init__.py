"""Sans-I/O adapters: bytes or frames in, ordered event sequences out."""
