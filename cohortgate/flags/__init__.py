"""Feature flags: the gateway's cohort assignment, asked through the OpenFeature API."""
