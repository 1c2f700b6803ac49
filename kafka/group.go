package kafka

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly/internal/pause"
)

// membership holds the consumer-group settings every consumer kind shares
// (Consumer in both modes, Processor): static membership and the group
// timeouts. Zero fields leave franz-go's value (45s session, 60s rebalance,
// 3s heartbeat), or the one given in ClientOpts, in place.
type membership struct {
	field             string // config type, for errors
	instanceID        string // group.instance.id; "" for a dynamic member
	sessionTimeout    time.Duration
	rebalanceTimeout  time.Duration
	heartbeatInterval time.Duration
}

// check validates the settings. The broker bounds the session timeout too
// (group.min.session.timeout.ms, 6s, and group.max.session.timeout.ms, 30
// min, by default) and refuses a join outside them.
func (m membership) check() error {
	switch {
	case m.sessionTimeout < 0, m.rebalanceTimeout < 0, m.heartbeatInterval < 0:
		return fmt.Errorf("kafka: %s: SessionTimeout, RebalanceTimeout and HeartbeatInterval must not be negative", m.field)
	case m.sessionTimeout > 0 && m.sessionTimeout < 100*time.Millisecond:
		return fmt.Errorf("kafka: %s.SessionTimeout (%s) is below 100ms", m.field, m.sessionTimeout)
	case m.rebalanceTimeout > 0 && m.rebalanceTimeout < 100*time.Millisecond:
		return fmt.Errorf("kafka: %s.RebalanceTimeout (%s) is below 100ms", m.field, m.rebalanceTimeout)
	case m.heartbeatInterval > 0 && m.sessionTimeout > 0 && m.heartbeatInterval >= m.sessionTimeout:
		return fmt.Errorf("kafka: %s.HeartbeatInterval (%s) must be well below SessionTimeout (%s)", m.field, m.heartbeatInterval, m.sessionTimeout)
	}
	if m.instanceID != "" {
		if err := checkIDPart(m.field, "InstanceID", m.instanceID); err != nil {
			return err
		}
	}
	return nil
}

// opts are the client options of the settings; they go after the caller's
// ClientOpts, so a field that is set wins.
func (m membership) opts() []kgo.Opt {
	var opts []kgo.Opt
	if m.instanceID != "" {
		opts = append(opts, kgo.InstanceID(m.instanceID))
	}
	if m.sessionTimeout > 0 {
		opts = append(opts, kgo.SessionTimeout(m.sessionTimeout))
		if m.heartbeatInterval == 0 {
			// franz-go's 3s default would miss a short session timeout.
			opts = append(opts, kgo.HeartbeatInterval(min(3*time.Second, m.sessionTimeout/10)))
		}
	}
	if m.rebalanceTimeout > 0 {
		opts = append(opts, kgo.RebalanceTimeout(m.rebalanceTimeout))
	}
	if m.heartbeatInterval > 0 {
		opts = append(opts, kgo.HeartbeatInterval(m.heartbeatInterval))
	}
	return opts
}

// groupWatch notices a member that holds no partition, or whose group has
// not settled, for longer than a rebalance timeout: by then a working
// coordinator has either completed the rebalance or removed the members
// that did not take part. It asks the coordinator (DescribeGroups) what it
// sees, logs a warning with that state and sets a gauge, so a wedged group
// shows in the member's log and stats instead of as silence.
type groupWatch struct {
	group string
	log   *slog.Logger

	stalled    atomic.Int64 // gauge: 1 while stalled
	partitions atomic.Int64 // gauge: partitions the coordinator assigns this member
}

// groupView is what one look at the group found.
type groupView struct {
	state      string
	members    int
	partitions int  // assigned to this member
	known      bool // this member is in the group
	err        error
}

func (v groupView) settled() bool {
	return v.err == nil && v.state == "Stable" && v.known && v.partitions > 0
}

// run watches until ctx ends. member returns the client whose membership is
// watched (nil while there is none, e.g. between two Processor sessions);
// admin sends the DescribeGroups requests. rebalance is the member's
// rebalance timeout; 0 reads it from admin's options.
func (w *groupWatch) run(ctx context.Context, admin *kgo.Client, member func() *kgo.Client, rebalance time.Duration) {
	if rebalance <= 0 {
		rebalance, _ = admin.OptValue(kgo.RebalanceTimeout).(time.Duration)
	}
	if rebalance <= 0 {
		rebalance = time.Minute
	}
	every := min(max(rebalance/10, 100*time.Millisecond), 5*time.Second)
	adm := kadm.NewClient(admin)
	unsettledSince := time.Now() // a member starts unsettled: it has to join
	var lastWarn time.Time
	pause.Every(ctx, every, func() bool {
		v := w.look(ctx, adm, member())
		if ctx.Err() != nil {
			return false
		}
		if v.known {
			w.partitions.Store(int64(v.partitions))
		} else {
			w.partitions.Store(0)
		}
		now := time.Now()
		if v.settled() {
			if w.stalled.Swap(0) == 1 {
				w.log.Info("consumer group settled again", "state", v.state, "members", v.members, "partitions", v.partitions,
					"after", now.Sub(unsettledSince).Round(time.Millisecond))
			}
			unsettledSince, lastWarn = time.Time{}, time.Time{}
			return true
		}
		if unsettledSince.IsZero() {
			unsettledSince = now
		}
		if now.Sub(unsettledSince) <= rebalance {
			return true
		}
		w.stalled.Store(1)
		if now.Sub(lastWarn) >= rebalance {
			lastWarn = now
			attrs := []any{"for", now.Sub(unsettledSince).Round(time.Millisecond), "rebalance_timeout", rebalance,
				"state", v.state, "members", v.members, "in_group", v.known, "partitions", v.partitions}
			if v.err != nil {
				attrs = append(attrs, "describe_err", v.err)
			}
			w.log.Warn("consumer group not settled: this member holds no partition or the group is still rebalancing, past the rebalance timeout; "+
				"members that crashed may still be counted by the coordinator (run members with a stable InstanceID under a restarting orchestrator)", attrs...)
		}
		return true
	})
}

// look describes the group and finds this member in it.
func (w *groupWatch) look(ctx context.Context, adm *kadm.Client, cl *kgo.Client) groupView {
	if cl == nil {
		return groupView{state: "no session"}
	}
	memberID, _ := cl.GroupMetadata()
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	described, err := adm.DescribeGroups(dctx, w.group)
	if err == nil {
		err = described.Error()
	}
	if err != nil {
		return groupView{state: "unknown", err: err}
	}
	g := described[w.group]
	v := groupView{state: g.State, members: len(g.Members)}
	for _, m := range g.Members {
		if memberID == "" || m.MemberID != memberID {
			continue
		}
		v.known = true
		if a, ok := m.Assigned.AsConsumer(); ok {
			for _, t := range a.Topics {
				v.partitions += len(t.Partitions)
			}
		}
	}
	return v
}
