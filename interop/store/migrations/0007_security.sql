-- Who may call the hub (issue 12): SMART backend clients, people and their logins, the keys the
-- hub signs its access tokens with. Audit records are FHIR AuditEvents in the resource tables.

-- Machine clients registered with `interop clients add` (SMART Backend Services, private_key_jwt).
CREATE TABLE client (
    client_id   text        PRIMARY KEY,
    name        text        NOT NULL,
    jwks        jsonb,                 -- the client's public keys, registered inline ...
    jwks_url    text,                  -- ... or fetched from its JWKS URL (cached as Cache-Control allows)
    scopes      text        NOT NULL,  -- the most it may ask for, space-separated SMART scopes
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz,
    CHECK ((jwks IS NULL) <> (jwks_url IS NULL))
);

-- Assertion ids already used, per client, until the assertion would have expired (replay guard).
CREATE TABLE client_assertion (
    client_id  text        NOT NULL REFERENCES client (client_id),
    jti        text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE INDEX client_assertion_expiry ON client_assertion (expires_at);

-- The hub's own token-signing keys (one current; replicas share it through the database).
CREATE TABLE signing_key (
    kid        text        PRIMARY KEY,
    pem        text        NOT NULL,   -- private key, PKCS#8 PEM
    created_at timestamptz NOT NULL DEFAULT now()
);

-- People with a local account (`interop users add`); OpenID Connect users have none.
CREATE TABLE person (
    name          text        PRIMARY KEY,
    role          text        NOT NULL CHECK (role IN ('radiologist', 'clinician', 'analyst', 'admin')),
    site          text,                 -- a clinician's facility code
    password_hash text        NOT NULL, -- Argon2id, PHC string
    failures      integer     NOT NULL DEFAULT 0,
    locked_until  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    disabled_at   timestamptz
);

-- Logins: the cookie holds a random token; only its SHA-256 is kept.
CREATE TABLE login_session (
    token_hash bytea       PRIMARY KEY,
    person     text        NOT NULL,
    role       text        NOT NULL,
    site       text,
    via        text        NOT NULL,   -- local | oidc
    csrf       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now(),
    ended_at   timestamptz
);
CREATE INDEX login_session_person ON login_session (person) WHERE ended_at IS NULL;
