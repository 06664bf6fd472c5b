"""Getting in: the SMART configuration and token endpoint for machine clients, and the login,
OpenID Connect and logout routes for people. What each route then allows is `interop.access`."""
