package main

import (
	"errors"
	"fmt"
	"strings"

	hide "github.com/exactlyonce/exactly/internal/redact"
	"github.com/exactlyonce/exactly/outbox"
)

// validate checks the options and fills in the derived defaults, stage by
// stage: the run's size, the broker, its address, the database and the
// relay's source, the inbox, the offsets.
func (o *demoOptions) validate() error {
	for _, check := range []func() error{o.checkSize, o.pickBroker, o.checkBrokerAddr, o.checkDB, o.pickInbox, o.checkOffsets} {
		if err := check(); err != nil {
			return err
		}
	}
	return nil
}

// checkSize checks the run's size and its stall timeout.
func (o *demoOptions) checkSize() error {
	for _, n := range []struct {
		flag      string
		v, lo, hi int
		note      string
	}{
		{"orders", o.orders, 100, 1_000_000, " (fewer leaves no room for the faults)"},
		{"writers", o.writers, 1, 64, ""},
	} {
		if n.v < n.lo || n.v > n.hi {
			return fmt.Errorf("--%s %d: want %d to %d%s", n.flag, n.v, n.lo, n.hi, n.note)
		}
	}
	if o.timeout <= 0 {
		return fmt.Errorf("--timeout must be positive, got %s", o.timeout)
	}
	return nil
}

// pickBroker sets --broker from the one broker address given, when it is
// not set, and refuses two brokers.
func (o *demoOptions) pickBroker() error {
	var given []string // the brokers' addresses given
	implied := demoKafka
	for _, b := range []struct{ name, addr string }{{demoKafka, o.kafka}, {demoNATS, o.nats}, {demoPubsub, o.pubsub}, {demoSQS, o.sqs}} {
		if b.addr != "" {
			given, implied = append(given, "--"+b.name), b.name
		}
	}
	if len(given) > 1 {
		return fmt.Errorf("%s both given: the demo uses one broker", strings.Join(given, " and "))
	}
	if o.broker == "" {
		o.broker = implied
	}
	if _, known := demoBrokerNotes[o.broker]; !known {
		return fmt.Errorf("--broker: unknown broker %q (want kafka, nats, pubsub or sqs)", o.broker)
	}
	if len(given) == 1 && implied != o.broker {
		return fmt.Errorf("--broker %s and %s both given: the demo uses one broker", o.broker, given[0])
	}
	return nil
}

// checkBrokerAddr checks the address of the broker picked.
func (o *demoOptions) checkBrokerAddr() error {
	switch {
	case o.broker == demoNATS && o.nats == "":
		return errors.New("--broker nats needs --nats nats://host:4222")
	case o.broker == demoSQS && o.sqs == "":
		return errors.New("--broker sqs needs --sqs ENDPOINT (http://host:4566 for an emulator, https://sqs.REGION.amazonaws.com for AWS)")
	case o.sqs != "":
		return checkSQSEndpoint(o.sqs)
	case o.kafka != "" && len(splitList(o.kafka)) == 0:
		return fmt.Errorf("--kafka %q: want host:port[,host:port...]", o.kafka)
	case o.broker == demoPubsub:
		if addr, from := pubsubEmulator(o.pubsub); addr != "" {
			return checkEmulatorAddr(from, addr)
		}
	}
	return nil
}

// checkDB checks the database DSN and that the relay's source can read it.
func (o *demoOptions) checkDB() error {
	dialect := ""
	switch {
	case o.db == "":
		dialect = outbox.SQLite
	case strings.HasPrefix(o.db, "postgres://"), strings.HasPrefix(o.db, "postgresql://"):
		dialect = outbox.Postgres
	case strings.HasPrefix(o.db, "mysql://"):
		dialect = outbox.MySQL
	default:
		return fmt.Errorf("--db: unrecognised database DSN (want postgres://... or mysql://...; leave it out for the embedded SQLite): %s", hide.String(o.db))
	}
	if err := checkSource(o.relay, dialect); err != nil {
		return fmt.Errorf("--relay: %w", err)
	}
	return nil
}

// pickInbox sets --inbox from --redis when it is not set, and checks it.
func (o *demoOptions) pickInbox() error {
	if o.inbox == "" {
		o.inbox = inboxSQL
		if o.redis != "" {
			o.inbox = inboxRedis
		}
	}
	switch o.inbox {
	case inboxSQL:
	case inboxRedis:
		if o.redis == "" {
			return errors.New("--inbox redis needs --redis redis://host:6379")
		}
	default:
		return fmt.Errorf("--inbox: unknown inbox %q (want sql or redis)", o.inbox)
	}
	return nil
}

// offsetsElsewhere says, per broker other than Kafka, why --offsets db is
// not for it.
var offsetsElsewhere = map[string]string{
	demoNATS:   "NATS tracks its consumers' positions itself",
	demoPubsub: "Pub/Sub tracks what each subscription acknowledged itself",
	demoSQS:    "SQS keeps a message until its consumer deletes it",
}

// checkOffsets checks --offsets against the broker and the inbox.
func (o *demoOptions) checkOffsets() error {
	switch o.offsets {
	case offsetsKafka:
		return nil
	case offsetsDB:
	default:
		return fmt.Errorf("--offsets: unknown value %q (want kafka or db)", o.offsets)
	}
	if why, ok := offsetsElsewhere[o.broker]; ok {
		return errors.New("--offsets db is for Kafka; " + why)
	}
	if o.redis != "" || o.inbox != inboxSQL {
		return errors.New("--offsets db claims each id in the effect's transaction with the SQL inbox, which --redis and --inbox would replace; leave them out")
	}
	return nil
}

// strategy describes the consumer side in a few words.
func (o *demoOptions) strategy() string {
	switch {
	case o.offsets == offsetsDB:
		return "offsets and id claims stored in the effect's transaction"
	case o.inbox == inboxRedis:
		return "Redis inbox"
	}
	return "SQL inbox"
}
