package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pgcdc"
)

// setup creates the run's database namespace, outbox, broker topics or
// stream, and the consumer side of its strategy.
func (r *demoRun) setup(ctx context.Context) error {
	o := r.o
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	db, err := openDemoDB(ctx, o.db, r.id)
	if err != nil {
		return err
	}
	r.db = db
	r.onCleanup(func() error {
		if r.keepDB {
			return db.db.Close()
		}
		if err := db.close(); err != nil {
			return fmt.Errorf("removing the demo's tables: %w", err)
		}
		return nil
	})
	for _, stage := range []func(context.Context) error{r.setupOutbox, r.setupBroker, r.setupConsumers} {
		if err := stage(ctx); err != nil {
			return err
		}
	}
	return nil
}

// setupOutbox creates the run's outbox, and the cdc relay's slot clean-up.
func (r *demoRun) setupOutbox(ctx context.Context) error {
	o, db := r.o, r.db
	var err error
	if r.ob, err = outbox.New(outbox.Config{Dialect: db.dialect, Table: db.table("outbox")}); err != nil {
		return err
	}
	if err := r.ob.Migrate(ctx, db.db); err != nil {
		return fmt.Errorf("migrating the outbox: %w", err)
	}
	// The cdc relay streams the run's own slot, dropped with its
	// publication when the demo ends (after the relay stopped).
	r.slot = "exactly_demo_" + r.id
	if o.relay == sourceCDC {
		r.onCleanup(func() error {
			dctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			err := pgcdc.DropSlot(dctx, o.db, r.slot)
			db.db.ExecContext(dctx, "DROP PUBLICATION IF EXISTS "+r.slot)
			if err != nil && !errors.Is(err, pgcdc.ErrSlotLost) {
				return fmt.Errorf("removing the demo's replication slot %s: %w", r.slot, err)
			}
			return nil
		})
	}
	return nil
}

// setupBroker connects to the broker and creates the run's topics, stream
// or queues.
func (r *demoRun) setupBroker(ctx context.Context) error {
	o := r.o
	var err error
	var kb *kafkaBroker
	switch o.broker {
	case demoNATS:
		if r.broker, err = newNATSBroker(ctx, o.nats, r.id, r.log); err != nil {
			return err
		}
	case demoPubsub:
		addr, from := pubsubEmulator(o.pubsub)
		if r.broker, err = newPubsubBroker(ctx, addr, from, r.id, r.f, r.log); err != nil {
			return err
		}
	case demoSQS:
		if r.broker, err = newSQSBroker(ctx, o.sqs, r.id, r.f, r.log); err != nil {
			return err
		}
	default:
		if kb, err = newKafkaBroker(ctx, splitList(o.kafka), r.id, r.log); err != nil {
			return err
		}
		r.broker = kb
	}
	r.onCleanup(func() error { r.broker.close(); return nil })
	return nil
}

// setupConsumers sets up the consumer side: the effect, and what makes it
// apply once.
func (r *demoRun) setupConsumers(ctx context.Context) error {
	o, db := r.o, r.db
	kb, _ := r.broker.(*kafkaBroker) // nil on the other brokers
	var err error
	switch {
	case o.offsets == offsetsDB:
		if err := kafka.MigrateOffsets(ctx, db.db, db.dialect, db.table(demoOffsetsTable)); err != nil {
			return fmt.Errorf("migrating the offsets table: %w", err)
		}
		kb.offsets = db
		// The stored offsets make redeliveries harmless, but a re-send by
		// the relay is a new record at a new offset: the message id is
		// claimed in the same transaction to absorb those.
		if r.claims, err = inbox.NewSQL(inbox.Config{Dialect: db.dialect, Table: db.table("inbox"), Consumer: "promotions"}); err != nil {
			return err
		}
		if err := r.claims.Migrate(ctx, db.db); err != nil {
			return fmt.Errorf("migrating the inbox: %w", err)
		}
	case o.inbox == inboxRedis:
		rc, err := openRedis(ctx, o.redis)
		if err != nil {
			return err
		}
		r.onCleanup(rc.Close)
		prefix := "exactly:demo:" + r.id + ":"
		r.onCleanup(func() error { deleteRedisKeys(rc, prefix); return nil })
		r.attempts = newAttemptLog()
		if r.redisIn, err = inbox.NewRedis(rc, inbox.RedisConfig{Prefix: prefix, Consumer: "promotions",
			Lease: 10 * time.Second, TTL: 10 * time.Minute, Hooks: r.attempts.hooks()}); err != nil {
			return err
		}
	default:
		if r.sqlIn, err = inbox.NewSQL(inbox.Config{Dialect: db.dialect, Table: db.table("inbox"), Consumer: "promotions"}); err != nil {
			return err
		}
		if err := r.sqlIn.Migrate(ctx, db.db); err != nil {
			return fmt.Errorf("migrating the inbox: %w", err)
		}
	}
	return nil
}
