// Package nats is the NATS JetStream adapter of exactly, built on
// github.com/nats-io/nats.go/jetstream.
//
// # Publisher
//
// [Publisher] implements exactly.Publisher. Each message is published to the
// subject Message.Topic (or what the SubjectFunc option makes of it) with
// these headers:
//
//   - Nats-Msg-Id: Message.ID, so the stream drops a re-publish of a message
//     it stored within its duplicate window (StreamConfig.Duplicates,
//     2 minutes by default);
//   - exactly-id: Message.ID again, which outlives the window and is what
//     the inbox deduplicates on;
//   - exactly-key: Message.Key, as NATS messages have no key of their own;
//   - exactly-created-at: Message.CreatedAt;
//   - the message's own headers.
//
// Publish sends the batch with PublishMsgAsync, keeping at most MaxInFlight
// messages awaiting their PubAck, and returns when every message is stored,
// or with a *exactly.BatchError naming the failed messages by index.
//
//	js, _ := jetstream.New(nc)
//	pub, err := nats.NewPublisher(js)
//	if err != nil { ... }
//	err = pub.Publish(ctx, msgs)
//
// # Guarantees
//
// A PubAck means the stream stored the message (with the stream's
// replication, on a quorum of its replicas). Messages of one call are sent in
// slice order on one connection and a stream stores them in that order, so a
// key keeps its order when nothing fails. When something fails, the error
// says which messages; by default the batch is pipelined and a later
// message of the same key may be stored before the relay's retry of the
// failed one. The StrictKeyOrder option closes that gap at the cost of a
// round trip per message of a key.
//
// A re-publish after an ambiguous outcome (a lost PubAck, AckWait passed,
// the context ended, the relay crashed before it marked the rows sent) is
// dropped by the stream when it comes within the duplicate window; after it,
// the stream stores a second copy carrying the same exactly-id and the inbox
// drops it. The publisher conformance suite runs with NativeDedup on.
//
// # Failures
//
// A message the server or the stream can never take fails matching
// exactly.ErrUnpublishable, and the relay parks it: an invalid message or
// subject (empty tokens, wildcards, whitespace), a header name NATS does not
// allow, a message larger than the server's max_payload (nats.ErrMaxPayload,
// checked by the client before sending) or than the stream's max_msg_size.
//
// A subject no stream captures fails with jetstream.ErrNoStreamResponse
// ("no responders"). That is not unpublishable: the stream may be created,
// or its leader elected, before the next attempt. Publish does not re-send
// by itself on no responders (the library's default would, from a timer,
// which can reorder a key); the relay retries the failed messages in order.
//
// Header values travel as NATS header lines: NATS trims their leading and
// trailing whitespace and turns CR and LF into spaces. That applies to
// exactly-key too, so keys with such characters arrive altered.
package nats
