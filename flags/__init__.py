"""Feature flags: the Unleash features document, bucketing, evaluation, providers."""
