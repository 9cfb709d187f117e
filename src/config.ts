// Every LIVESNAP_* setting of the environment is read here, once, and passed down from here.
import * as path from 'node:path';

/** Where exports keep their state directories unless `serve --state` says otherwise. */
export function stateRoot(): string {
  return path.resolve(process.env.LIVESNAP_STATE_DIR || '/var/lib/livesnap');
}
