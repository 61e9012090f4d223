"""Incidents, root-slice attribution, failure book (Redis), Alertmanager, alerts topic."""
