// Package examples holds services in other languages that use exactly
// through plain SQL (see docs/outbox-format.md): python/, java/ and node/
// write an order and its event in one transaction with a plain INSERT into
// the outbox, and python/consumer.py applies an effect once per message id
// through the inbox claim. Its tests run them against PostgreSQL with the
// relay publishing to NATS JetStream; scripts/polyglot-deps installs what
// they need.
package examples
