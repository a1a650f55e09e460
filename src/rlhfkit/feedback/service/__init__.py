"""The feedback service's operations, independent of HTTP: every SQL statement of the web app
and the CLI sits behind a function here, so routers only authenticate, call, and shape replies.

- `errors`: what an operation refuses with (bad answer, forbidden, conflict);
- `audit`: the audit log (who did what, from which address);
- `accounts`: users, roles, passwords, API tokens, browser sessions, the per-request lookup;
- `tasks`: tasks, membership, visibility, progress; importing items;
- `answers`: checking an answer and mapping it from display positions to stored indices;
- `assign`: serving the next item (overlap slots, claims, expiry);
- `labels`: submitting, skipping, correcting and reading labels;
- `fastpath`: /next and submit as single statements in autocommit (PostgreSQL);
- `review`: accepting and rejecting labels, the review queue.
"""
