// Errors a user can act on: what was wrong and what to do. The CLI prints `message` (and `hint`)
// without a stack trace and exits with `exitCode`.
export class UserError extends Error {
  constructor(message: string, readonly hint?: string, readonly exitCode = 1) {
    super(message);
    this.name = 'UserError';
  }
}

export function errorText(e: unknown): string {
  if (e instanceof UserError) return e.hint ? `${e.message}\n  hint: ${e.hint}` : e.message;
  if (e instanceof Error) return e.message;
  return String(e);
}
