// Package pubsub is the Google Cloud Pub/Sub adapter of exactly, built on
// cloud.google.com/go/pubsub/v2.
//
// # Publisher
//
// [Publisher] implements exactly.Publisher. Each message is published, with
// message ordering enabled, to the topic PublisherConfig.Topic names (by
// default Message.Topic, a topic ID in the client's project), with:
//
//   - ordering key: Message.Key, so a subscription with message ordering
//     delivers a key's messages in the order they were published;
//   - data: Message.Payload;
//   - attribute exactly-id: Message.ID, what the inbox deduplicates on
//     (Pub/Sub's message_id is assigned by the service to every copy anew);
//   - attribute exactly-created-at: Message.CreatedAt;
//   - the message's headers as further attributes.
//
// With the client library imported as gpubsub:
//
//	client, err := gpubsub.NewClient(ctx, "my-project")
//	if err != nil { ... }
//	pub, err := pubsub.NewPublisher(client, pubsub.PublisherConfig{})
//	if err != nil { ... }
//	defer pub.Close()
//	err = pub.Publish(ctx, msgs)
//
// gpubsub.NewClient uses Application Default Credentials, and talks to an
// emulator (or pstest) instead when PUBSUB_EMULATOR_HOST is set.
//
// # Consumer
//
// [Consumer] pulls from a subscription with streaming pull, on the one
// consumer contract of exactly.ConsumerConfig: the Handler's effect commits
// before the ack; while it runs (and is retried, with backoff) the client
// library extends the message's ack deadline; after Retry.MaxAttempts the
// message is dead-lettered with the exactly-dead-* headers and acknowledged
// only once the dead letter is confirmed. On a subscription with message
// ordering the messages of one key are handled one at a time, in order. On
// a subscription with exactly-once delivery the ack's outcome is awaited
// (AckWithResult); a failed one is counted (AckFailures, the AckFailed
// hook) and the message may come again, which the inbox absorbs.
//
//	c, err := pubsub.NewConsumer(client, pubsub.ConsumerConfig{
//		ConsumerConfig: exactly.ConsumerConfig{Handler: in.Handler(db, apply)},
//		Subscription:   "orders-billing",
//	})
//	if err != nil { ... }
//	err = c.Run(ctx)
//
// # Guarantees
//
// A confirmed message is stored by Pub/Sub. Messages of one key are handed
// to the client library in slice order, which sends at most one request per
// ordering key at a time. When a request fails, the library pauses its key
// and fails the key's later messages unsent, so for every key the confirmed
// messages are a prefix of the call's messages. The next Publish of the key
// resumes it (once every earlier message of the key has its outcome); other
// keys never wait for it.
//
// The relay uses Send and Resume instead (exactly.PipelinedPublisher): it
// hands the publisher several batches at once, messages of one key in more
// than one of them, and the library sends them in the order of the calls.
// Send never resumes a key, so the messages of a paused key handed over
// before the relay learnt of the failure fail unsent; the relay resumes the
// key with the failed message's retry, once none of the key's messages is
// in flight. So for every key the confirmed messages stay a prefix of its
// messages across the batches too.
//
// A message whose outcome is not known (the service did not answer within
// the publish timeout, the context ended) is reported as
// exactly.ErrOutcomeUnknown and published again: Pub/Sub then stores a
// second copy, with the same exactly-id, and delivers both. Pub/Sub's
// exactly-once delivery (a subscription setting) does not remove those
// copies: it is about redelivery of one published message, and two
// publishes are two messages. That is why consumers keep the inbox.
//
// # What the tests cannot cover
//
// The package's tests run on pstest, Google's in-process fake, with its
// error injection and gRPC interceptors for the faults: publish answers lost
// after the server stored the message, refused and paused ordering keys,
// failed acks, consumers that die holding messages, handlers that outlive
// the ack deadline, and deliveries counted by a dead-letter policy. pstest
// does not emulate, and so the tests leave to the real service:
//
//   - Server-side exactly-once delivery. pstest hands the subscription's
//     setting to the client library, which then awaits every ack's outcome,
//     but it never expires an ack ID, never refuses an ack of a message
//     redelivered meanwhile, and does not stop a redelivery after a
//     confirmed ack. The tests inject a failed ack (the Consumer counts it
//     and the inbox absorbs the redelivery); that the service's own
//     guarantee holds is not tested here.
//   - The dead-letter policy on an ordered subscription. pstest v2.9.0 keeps
//     a delivered message that reached MaxDeliveryAttempts in the
//     subscription (its ack by message ID misses the message's ack ID): its
//     ordering key never moves again and the message is published to the
//     dead-letter topic anew every 10ms. The tests check the delivery
//     attempt the Consumer counts from, on an ordered subscription, and the
//     policy's move on an unordered one; that an ordered key flows on after
//     the service dead-letters one of its messages, and that the copy
//     arrives on the dead-letter topic once, are not tested.
//   - Everything of a real network and service: latency, quotas and
//     throttling, regional endpoints, retention, and the service's
//     throughput (the benchmark's Pub/Sub rows compare the relay with the
//     client library on pstest, nothing more).
package pubsub
