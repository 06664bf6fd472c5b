"""Provincial analytics: de-identified facts per analysed study and finding, the views over
them, a forecast, exports (CSV, FHIR MeasureReport) and the dashboard. See docs/ANALYTICS.md.

The one entry point the pipeline calls is `facts.record(conn, report_id, event=...)`, inside the
transaction that changed the report.
"""
