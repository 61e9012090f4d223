"""Request and response models of the triage API (request models never double as responses)."""
