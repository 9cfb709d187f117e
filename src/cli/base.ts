// What every command shares: --json, errors printed as "what was wrong / what to do", exit codes.
import { Command, Option } from 'clipanion';
import { config } from '../config';
import { Reporter } from './reporter';
import { errorText, UserError } from '../util/errors';
import { CorruptFileSystemError } from '../fs/used-map';

export abstract class LivesnapCommand extends Command {
  json = Option.Boolean('--json', false, { description: 'Print one JSON object per line on stdout (the last one is the result)' });

  protected reporter!: Reporter;

  abstract run(): Promise<number>;

  protected dataOnStdout(): boolean {
    return false;
  }

  async execute(): Promise<number> {
    // When data goes to standard output (an archive on "--to -"), JSON events move to stderr.
    this.reporter = new Reporter({ json: this.json, out: this.dataOnStdout() ? process.stderr : process.stdout });
    try {
      return await this.run();
    } catch (e) {
      this.reporter.clearBar();
      const known = e instanceof UserError || e instanceof CorruptFileSystemError;
      const text = errorText(e);
      // Never on stdout when it carries the archive (or its reader has gone: EPIPE would crash).
      if (this.json) (this.dataOnStdout() ? process.stderr : process.stdout).write(JSON.stringify({ event: 'error', message: (e as Error).message, hint: e instanceof UserError ? e.hint : undefined }) + '\n');
      process.stderr.write(`livesnap: error: ${text}\n`);
      if (!known && config().debug && e instanceof Error) process.stderr.write(`${e.stack}\n`);
      return e instanceof UserError ? e.exitCode : 1;
    }
  }
}
