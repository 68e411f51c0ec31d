"""Pure core: policy, cohorts, decisions, rollout state, statistics and the names processes share. No I/O."""
