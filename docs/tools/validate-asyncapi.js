#!/usr/bin/env node
/*
 * Validates an AsyncAPI document (default: docs/asyncapi.yaml) with the
 * official AsyncAPI parser: the specification's JSON schema plus the
 * parser's semantic rules. Prints every diagnostic; exit status 1 when
 * any is an error (warnings are printed but do not fail).
 *
 *   cd docs/tools && npm ci && node validate-asyncapi.js [FILE]
 */
'use strict';

const path = require('node:path');
const { Parser, fromFile } = require('@asyncapi/parser');

const SEVERITY = ['error', 'warning', 'info', 'hint'];

async function main() {
  const file = process.argv[2] || path.join(__dirname, '..', 'asyncapi.yaml');
  const parser = new Parser();
  const { document, diagnostics } = await fromFile(parser, file).parse();
  let errors = 0;
  for (const diagnostic of diagnostics) {
    const where = diagnostic.path.join('/') || '(document)';
    console.log(`${SEVERITY[diagnostic.severity]}: ${where}: ${diagnostic.message} [${diagnostic.code}]`);
    if (diagnostic.severity === 0) errors += 1;
  }
  if (!document || errors) {
    console.log(`${file}: invalid (${errors} errors)`);
    process.exitCode = 1;
    return;
  }
  console.log(`${file}: valid AsyncAPI ${document.version()}, ${document.channels().length} channels, ${document.operations().length} operations`);
}

main().catch((error) => {
  console.error(error.stack || String(error));
  process.exitCode = 2;
});
