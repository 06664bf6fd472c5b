"""Who may do what: SMART backend clients and their tokens, people and their logins, the audit
trail, and the URLs the hub may call."""
