"""The local stack behind `cohortgate up`: plan, supervisor, and the client helpers for a running stack."""
