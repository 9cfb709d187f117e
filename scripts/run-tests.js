#!/usr/bin/env node
// Runs the ava suite and ends with the plain closing line "N passed, N failed[, N skipped]".
// Skipped tests print their reason (see test/helpers/skip.ts).
'use strict';
const { spawn } = require('node:child_process');
const path = require('node:path');

const args = ['--tap', ...process.argv.slice(2)];
const ava = spawn(process.execPath, [path.join(__dirname, '../node_modules/ava/entrypoints/cli.mjs'), ...args], {
  stdio: ['ignore', 'pipe', 'inherit'],
});
let pass = 0, fail = 0, skip = 0, todo = 0, buf = '';
// A hung test must fail the run, not hold CI until its own limit: no TAP output for 6 minutes
// (ava's per-test timeout is 5) ends the run as a failure, naming the last finished test.
let last = '(none)';
let quiet = setTimeout(onHang, 6 * 60_000);
function onHang() {
  console.log(`# no test finished for 6 minutes after "${last}": stopping the run`);
  fail++;
  ava.kill('SIGKILL');
}
ava.stdout.on('data', (chunk) => {
  clearTimeout(quiet);
  quiet = setTimeout(onHang, 6 * 60_000);
  process.stdout.write(chunk);
  buf += chunk.toString();
  let nl;
  while ((nl = buf.indexOf('\n')) >= 0) {
    const line = buf.slice(0, nl);
    buf = buf.slice(nl + 1);
    let m;
    if ((m = /^(?:not )?ok \d+ - (.*)$/.exec(line))) last = m[1];
    if ((m = /^# pass (\d+)/.exec(line))) pass = +m[1];
    else if ((m = /^# fail (\d+)/.exec(line))) fail = +m[1];
    else if ((m = /^# skip (\d+)/.exec(line))) skip = +m[1];
    else if ((m = /^# todo (\d+)/.exec(line))) todo = +m[1];
  }
});
ava.on('close', (code) => {
  clearTimeout(quiet);
  if (code !== 0 && fail === 0) fail = 1; // a crash or an uncaught error counts as a failure
  console.log(`${pass} passed, ${fail} failed` + (skip + todo ? `, ${skip + todo} skipped` : ''));
  process.exit(fail > 0 ? 1 : 0);
});
