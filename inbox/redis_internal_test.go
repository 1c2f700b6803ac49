package inbox

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/exactlyonce/exactly/internal/testenv"
)

// TestEvalEachLoadsMissingScript: a pipelined EVALSHA of a script the
// server has never seen (a restart flushed its cache) falls back to EVAL.
func TestEvalEachLoadsMissingScript(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.Redis)
	client := redis.NewClient(&redis.Options{Addr: testenv.Redis.Addr})
	defer client.Close()
	r, err := NewRedis(client, RedisConfig{Consumer: "c"})
	if err != nil {
		t.Fatal(err)
	}
	// A script no server has cached: its source is unique to this run.
	script := redis.NewScript(fmt.Sprintf("-- %d\nreturn ARGV[1] .. KEYS[1]", time.Now().UnixNano()))
	cmds := r.evalEach(context.Background(), script, []string{"a", "b"}, "x")
	for i, want := range []string{"xa", "xb"} {
		if got, err := cmds[i].Text(); err != nil || got != want {
			t.Errorf("call %d: %q, %v; want %q", i, got, err, want)
		}
	}
}
