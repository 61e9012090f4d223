"""FastAPI triage API."""
