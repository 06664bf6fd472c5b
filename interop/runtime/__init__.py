"""Embedded peers the hub can start itself: PostgreSQL, tritonserver, process supervision."""
