package outboxstore

import "fmt"

// Outbox is what an *outbox.Outbox tells of itself: its validated dialect
// and table.
type Outbox interface {
	Dialect() string
	Table() string
}

// For returns the store of ob, an *outbox.Outbox, for the relays, the CLI
// and the test suites of this module, so that outbox exports no internal
// type. ob's dialect and table were validated when it was made, so For
// fails only on a value that did not come from outbox.New.
func For(ob Outbox) *Store {
	s, err := New(ob.Dialect(), ob.Table())
	if err != nil {
		panic(fmt.Sprintf("outboxstore.For: not an outbox made by outbox.New: %v", err))
	}
	return s
}
