"""Small helpers several rooms need, each defined once: atomic files and file watching, durations, loopback HTTP.

Imports nothing of cohortgate but the core's errors, so every package may use it.
"""
