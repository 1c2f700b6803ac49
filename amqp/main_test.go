package amqp_test

import (
	"flag"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"github.com/exactlyonce/exactly/internal/testenv"
)

// TestMain skips the examples, which cannot skip themselves, when the
// RabbitMQ they use (localhost:5672) is not there, as testenv.Need does for
// the tests: outside CI only.
func TestMain(m *testing.M) {
	flag.Parse()
	const exampleBroker = "localhost:5672"
	if c, err := net.DialTimeout("tcp", exampleBroker, 2*time.Second); err == nil {
		c.Close()
	} else if !testenv.InCI() {
		skip := "^Example"
		if s := flag.Lookup("test.skip").Value.String(); s != "" {
			skip = s + "|" + skip
		}
		_ = flag.Set("test.skip", skip)
		fmt.Fprintf(os.Stderr, "amqp: skipping the examples: RabbitMQ is not reachable at %s (%v); start it with: %s\n",
			exampleBroker, err, testenv.RabbitMQ.Start)
	}
	os.Exit(m.Run())
}
