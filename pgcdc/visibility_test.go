package pgcdc_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// TestCommitDecodedBeforeVisible: logical decoding hands out a commit as
// soon as its WAL is flushed, before other sessions see the transaction (with
// synchronous replication the commit waits for the standby in between). The
// writer here commits with synchronous_commit = on while the standby it
// waits for does not exist, so its row is published while still invisible.
// The relay must neither delete nor park the row in that window (a DELETE
// affects 0 rows, a park finds no row) and confirm the position: once the
// commit is released, the row is gone (or parked, not copied), and the slot
// goes past it.
func TestCommitDecodedBeforeVisible(t *testing.T) {
	t.Parallel()
	in := testenv.LogicalPostgres(t, map[string]string{
		"synchronous_standby_names": "'nosuchstandby'",
		"synchronous_commit":        "local", // only the writer below waits for the standby
	})
	for _, park := range []bool{false, true} {
		name := "delete"
		if park {
			name = "park"
		}
		t.Run(name, func(t *testing.T) {
			f := setupOn(t, in.DSN("test"))
			rec := &exactlytest.Recorder{}
			if park {
				rec.FailWhen(func(*exactly.Message) error { return exactly.Unpublishable(errors.New("refused by the test")) })
			}
			r, _ := start(t, f.config(rec))
			f.waitStreaming()
			ctx := context.Background()

			writer, err := pgx.Connect(ctx, in.DSN("test"))
			if err != nil {
				t.Fatal(err)
			}
			defer writer.Close(ctx)
			var pid int
			if _, err := writer.Exec(ctx, "SET synchronous_commit = on"); err != nil {
				t.Fatal(err)
			}
			if err := writer.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
				t.Fatal(err)
			}
			m := &exactly.Message{Topic: "t", Key: "k", Payload: []byte("invisible")}
			tx, err := writer.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := f.ob.Enqueue(ctx, tx, m); err != nil {
				t.Fatal(err)
			}
			committed := make(chan error, 1)
			go func() { committed <- tx.Commit(ctx) }()

			waitFor(t, "the writer's COMMIT waiting for the standby", 10*time.Second, func() bool {
				var waiting bool
				err := f.pool.QueryRow(ctx, "SELECT coalesce(wait_event = 'SyncRep', false) FROM pg_stat_activity WHERE pid = $1", pid).Scan(&waiting)
				return err == nil && waiting
			})
			waitFor(t, "the relay publishing the invisible row", 10*time.Second, func() bool {
				if park {
					return r.Stats().Dead >= 1
				}
				return rec.Count(m.ID) >= 1
			})
			// The commit's end is at or below this position; heartbeats
			// would take the slot past it at once if the relay took the
			// row as done.
			before := currentLSN(t, f.pool)
			deadline := time.Now().Add(2 * time.Second)
			for time.Now().Before(deadline) {
				if got, _ := slotConfirmed(t, f.pool, f.slot); got >= before {
					t.Errorf("slot confirmed %s, past the transaction (ending at or below %s), while its row is not visible yet", got, before)
					break
				}
				time.Sleep(20 * time.Millisecond)
			}

			// Release the COMMIT: a cancelled wait for the standby commits
			// locally, with a warning.
			if _, err := f.pool.Exec(ctx, "SELECT pg_cancel_backend($1)", pid); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-committed:
				if err != nil {
					t.Fatalf("COMMIT: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the COMMIT was not released")
			}
			after := currentLSN(t, f.pool)
			waitFor(t, "the row gone from the outbox and the slot past it", 20*time.Second, func() bool {
				got, _ := slotConfirmed(t, f.pool, f.slot)
				return got >= after && f.rows(0) == 0
			})
			if park {
				if n := f.rows(2); n != 1 {
					t.Errorf("%d dead rows, want 1 (the row itself, parked)", n)
				}
			} else if n := f.rows(2); n != 0 {
				t.Errorf("%d dead rows, want 0", n)
			}
			var total int
			if err := f.pool.QueryRow(ctx, "SELECT count(*) FROM "+f.ob.Table()).Scan(&total); err != nil {
				t.Fatal(err)
			}
			if want := map[bool]int{false: 0, true: 1}[park]; total != want {
				t.Errorf("%d rows in the outbox table, want %d", total, want)
			}
			if st := r.Stats(); !park && st.Published != 1 {
				t.Errorf("Stats.Published = %d, want 1", st.Published)
			}
		})
	}
}
