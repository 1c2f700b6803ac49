// Package sqs publishes exactly.Messages to Amazon SQS queues and consumes
// them (AWS SDK for Go v2): Publisher, and Consumer on the consumer
// contract every broker of this module keeps (delete only after the effect
// committed, visibility extended while a message is held, retries in
// place, dead letters after MaxAttempts counted from SQS's receive count,
// per-key workers that keep a FIFO group's order, SNS deliveries raw or in
// their envelope).
//
// # How a message travels
//
// The body is the payload when it is text SQS accepts (valid UTF-8 of
// SQS's character set); otherwise it is the payload's base64 and the
// exactly-encoding attribute says "base64" ("empty" for an empty payload,
// whose body is one space, since SQS refuses an empty body). The
// attributes are exactly-id (Message.ID), exactly-key (Message.Key, when
// not empty; Binary when it is not text), exactly-created-at, and the
// headers. SQS allows 10 attributes a message: when the headers fit beside
// exactly's own and every name is a valid attribute name and every value
// non-empty text, each header is an attribute; otherwise all the headers
// travel as one JSON object in the exactly-headers attribute.
//
// # FIFO and standard queues
//
// On a FIFO queue, MessageDeduplicationId is Message.ID: a re-publish
// within SQS's deduplication window of 5 minutes (a relay retry after a
// lost answer, a relay crash before it marked the row sent) is dropped by
// SQS. A re-publish after the window is stored again, with the same
// exactly-id, and the consumer's inbox must drop it. MessageGroupId is
// Message.Key, so SQS keeps each key's order; a message without a Key is
// a group of its own. A Key or ID that is not 1-128 printable ASCII
// characters is replaced by "sha256-" and its hex SHA-256.
//
// A standard queue delivers every message at least once, sometimes twice
// or more even when it was published once, and in no guaranteed order: the
// inbox must cover every delivery, and an application that needs per-key
// order needs a FIFO queue.
//
// # Limits
//
// A message is at most PublisherConfig.MaxMessageSize bytes (default 256
// KiB), counting the body and every attribute's name, type and value; a
// larger one is exactly.ErrUnpublishable and the relay parks it.
package sqs
