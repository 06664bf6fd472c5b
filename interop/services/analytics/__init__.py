"""Provincial analytics: de-identified facts per analysed study and finding (`facts`, written in
the transaction that changed the report), pseudonymous patient keys (`pseudonym`), a forecast
(`forecast`) and exports (`export`: CSV with small cells suppressed, a FHIR MeasureReport). The
views are SQL (`interop.store.analytics`); the dashboard is `interop.web.dashboard`. See
docs/ANALYTICS.md.
"""
