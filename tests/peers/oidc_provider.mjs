// A hospital's OpenID Connect provider for the login tests: panva's certified `oidc-provider`
// on 127.0.0.1, with its development login/consent pages (any login name, any password) and a
// small table of people whose hub roles and site go into the ID token.
//
//   node oidc_provider.mjs PORT CLIENT_ID REDIRECT_URI [CLIENT_SECRET]
//
// With CLIENT_SECRET the client is confidential (client_secret_basic); without, it is a public
// client (token_endpoint_auth_method none). Either way PKCE with S256 is required. The issuer is
// http://127.0.0.1:PORT; "listening" on stdout says it is up.
import { generateKeyPairSync, randomBytes } from 'node:crypto';

import Provider from 'oidc-provider';

const [port, clientId, redirectUri, clientSecret] = process.argv.slice(2);
if (!port || !clientId || !redirectUri) {
  console.error('usage: node oidc_provider.mjs PORT CLIENT_ID REDIRECT_URI [CLIENT_SECRET]');
  process.exit(2);
}

// Who may log in, and what the ID token says of them (preferred_username is the login name).
const PEOPLE = {
  'bs.hoa': { roles: ['radiologist'] },
  'cn.mai': { roles: ['clinician'], site: 'BVDKDN' },
  'ks.ha': { roles: ['analyst'] },
  nobody: {},
};

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signing = { ...privateKey.export({ format: 'jwk' }), kid: 'test-rs256', alg: 'RS256', use: 'sig' };

const client = {
  client_id: clientId,
  redirect_uris: [redirectUri],
  grant_types: ['authorization_code'],
  response_types: ['code'],
  ...(clientSecret
    ? { client_secret: clientSecret, token_endpoint_auth_method: 'client_secret_basic' }
    : { token_endpoint_auth_method: 'none' }),
};

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [client],
  jwks: { keys: [signing] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  pkce: { required: () => true },  // S256 is the only method this provider accepts
  features: { devInteractions: { enabled: true } },
  claims: { openid: ['sub', 'preferred_username', 'roles', 'site'] },
  conformIdTokenClaims: false,  // the claims of the granted scopes go into the ID token itself
  async findAccount(ctx, id) {
    const person = PEOPLE[id];
    if (!person) return undefined;  // unknown login names: the provider refuses them
    return {
      accountId: id,
      async claims() {
        return { sub: id, preferred_username: id, ...person };
      },
    };
  },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));

const server = provider.listen(Number(port), '127.0.0.1', () => {
  console.log(`listening on http://127.0.0.1:${port} (client ${clientId}, ${clientSecret ? 'confidential' : 'public'})`);
});
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
