"""Radiologist review of AI reports, and critical-result notifications."""
