"""The local stack behind `cohortgate up`: plan and recipes (pure), probes, supervisor, live policy,
banner, the composition root (`stack`), and the client helpers for a running stack (`client`)."""
