"""Temporal activities: every PVE call in activities/pve.py, every database call in activities/db.py."""
