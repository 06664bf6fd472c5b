"""Synthetic data: DICOM studies that describe no person, and analytics facts for the dashboard."""
