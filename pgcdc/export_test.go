package pgcdc

// SetAfterPublish installs a hook that runs after the broker confirmed a
// batch (the Kafka transaction committed) and before anything is recorded
// or confirmed to PostgreSQL: the crash window.
func SetAfterPublish(r *Relay, fn func()) {
	r.afterPublish = func([]*entry, []error) { fn() }
}
