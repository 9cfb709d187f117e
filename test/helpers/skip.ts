// Skips that say why: the reason is printed and counted in the closing line.
import test, { type ExecutionContext } from 'ava';
import { isRoot, which } from './system';

/** Registers `title` as skipped (with its reason printed) when a requirement is missing. */
export function requirements(needs: { root?: boolean; commands?: string[] }): string | undefined {
  if (needs.root && !isRoot) return 'needs root (loop devices, mounts)';
  for (const c of needs.commands ?? []) if (!which(c)) return `needs the command "${c}" (scripts/setup --test installs it)`;
  return undefined;
}

export function testIf(needs: { root?: boolean; commands?: string[] }, opts: { serial?: boolean } = {}) {
  const why = requirements(needs);
  return (title: string, fn: (t: ExecutionContext) => Promise<void> | void) => {
    if (why) {
      console.log(`# SKIP ${title}: ${why}`);
      test.skip(`${title} (skipped: ${why})`, () => {});
    } else if (opts.serial) {
      test.serial(title, fn);
    } else {
      test(title, fn);
    }
  };
}

/** testIf, but the tests of a file run one after the other (they share state or time things). */
export function serialIf(needs: { root?: boolean; commands?: string[] }) {
  return testIf(needs, { serial: true });
}
