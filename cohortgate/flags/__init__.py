"""Feature flags: the gateway's cohort assignment, asked through the OpenFeature API.

``pip install cohortgate[openfeature]``; see ``cohortgate.flags.provider`` for what a flag key and
an evaluation context mean.
"""

from cohortgate.flags.provider import CohortgateProvider

__all__ = ["CohortgateProvider"]
