// The process the replica tests kill: applies phases of a seeded scenario (replica-volumes.ts) to a
// replica through ReplicaSink, in order. LIVESNAP_TEST_KILL_AT=replica:N (config.ts) makes it
// SIGKILL itself at its N-th I/O step. On success it prints the steps it took and where each
// phase began: {"steps":[...],"starts":{"A":0,...}}.
//   node replica-child.js REPLICA SEED PHASES [APPLY_BATCH_BYTES]     (PHASES e.g. "A,B,C")
import { faultStepsTaken } from '../../src/incremental/replica-state';
import { ReplicaSink } from '../../src/incremental/replica';
import { feedPhase, replicaScenario } from './replica-volumes';

async function main(): Promise<void> {
  const [replica, seedText, phasesText, batchText] = process.argv.slice(2);
  if (!replica || !seedText || !phasesText) throw new Error('usage: replica-child REPLICA SEED PHASES [APPLY_BATCH_BYTES]');
  const seed = Number(seedText);
  const scenario = replicaScenario(seed);
  const starts: Record<string, number> = {};
  for (const name of phasesText.split(',') as Array<'A' | 'B' | 'C'>) {
    starts[name] = faultStepsTaken().length;
    await feedPhase(new ReplicaSink(replica, { batchBytes: Number(batchText ?? 64 << 10) }), scenario[name], seed + name.charCodeAt(0));
  }
  process.stdout.write(JSON.stringify({ steps: faultStepsTaken(), starts }) + '\n');
}

main().catch((e: unknown) => {
  process.stderr.write(`replica-child: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exit(1);
});
