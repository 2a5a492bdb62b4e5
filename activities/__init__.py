"""Temporal activities: the PVE steps in activities/pve.py (over pve/), the database steps in activities/db.py
(over db/), admission in activities/admission.py."""
