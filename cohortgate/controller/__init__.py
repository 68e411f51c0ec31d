"""The rollback/promotion controller: pure statistics, windows, verdicts and the rollout table
(`stats`, `windows`, `verdict`, `rollout`, `shadows`), and the service around them (`loop`,
`leader`, `api`). Importing the package itself pulls in nothing heavy.
"""
