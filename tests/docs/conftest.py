def pytest_configure(config):
    config.addinivalue_line(
        "markers", "docs: runs the shell blocks of README.md and docs/*.md as a user would paste them"
    )
