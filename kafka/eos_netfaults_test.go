package kafka_test

import (
	"encoding/binary"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// netFaults sits between kfake's brokers and their clients (kfake.ListenFn)
// and does what a network does to the Kafka protocol: it delays requests,
// and it loses or garbles the answer of an EndTxn the broker has applied,
// so the client cannot know whether its commit happened.
type netFaults struct {
	mu       sync.Mutex
	delays   int // requests left to delay
	maxDelay time.Duration
	endTxn   *endTxnFault // armed, or nil

	delayed, lost, rewritten atomic.Int64
}

// endTxnFault takes the first committing EndTxn and the next EndTxn
// requests of the same transactional ID, answers in all.
type endTxnFault struct {
	txnID   string // picked by the first committing EndTxn
	left    int
	reply   *kerr.Error // nil: lose the answer and close the connection
	applied chan bool   // whether the broker applied the first one
	once    sync.Once
}

func (nf *netFaults) Listen(network, addr string) (net.Listener, error) {
	l, err := net.Listen(network, addr)
	if err != nil {
		return nil, err
	}
	return &faultyListener{Listener: l, nf: nf}, nil
}

// delay makes the next n requests, on any connection, wait up to max
// before the broker reads them.
func (nf *netFaults) delay(n int, max time.Duration) {
	nf.mu.Lock()
	defer nf.mu.Unlock()
	nf.delays += n
	nf.maxDelay = max
}

// armEndTxn arms a fault on the next committing EndTxn: its answer, and
// those of the next answers-1 EndTxn requests of the same transactional ID
// (the client's retries), are lost, or replaced by reply when it is not
// nil. It returns false when a fault is armed already.
func (nf *netFaults) armEndTxn(answers int, reply *kerr.Error) (applied <-chan bool, ok bool) {
	nf.mu.Lock()
	defer nf.mu.Unlock()
	if nf.endTxn != nil {
		return nil, false
	}
	f := &endTxnFault{left: answers, reply: reply, applied: make(chan bool, 1)}
	nf.endTxn = f
	return f.applied, true
}

type faultyListener struct {
	net.Listener
	nf *netFaults
}

func (l *faultyListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &faultyConn{Conn: c, nf: l.nf, pending: map[int32]pendingAnswer{}}, nil
}

type pendingAnswer struct {
	version int16
	fault   *endTxnFault
	first   bool
}

type faultyConn struct {
	net.Conn
	nf   *netFaults
	rbuf []byte // request bytes read, short of a whole frame

	mu      sync.Mutex
	pending map[int32]pendingAnswer // correlation id -> answer to tamper with
	wbuf    []byte                  // answer bytes written, short of a whole frame
}

func (c *faultyConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.rbuf = append(c.rbuf, p[:n]...)
		var sleep time.Duration
		for len(c.rbuf) >= 4 {
			size := int(binary.BigEndian.Uint32(c.rbuf))
			if len(c.rbuf) < 4+size {
				break
			}
			sleep = max(sleep, c.inspect(c.rbuf[4:4+size]))
			c.rbuf = append(c.rbuf[:0], c.rbuf[4+size:]...)
		}
		if sleep > 0 {
			time.Sleep(sleep)
		}
	}
	return n, err
}

// inspect looks at one request frame: it returns how long to delay it and
// marks the EndTxn requests whose answers must be tampered with.
func (c *faultyConn) inspect(frame []byte) time.Duration {
	if len(frame) < 10 {
		return 0
	}
	key := int16(binary.BigEndian.Uint16(frame[0:]))
	version := int16(binary.BigEndian.Uint16(frame[2:]))
	corr := int32(binary.BigEndian.Uint32(frame[4:]))
	nf := c.nf
	nf.mu.Lock()
	defer nf.mu.Unlock()
	var sleep time.Duration
	if nf.delays > 0 && rand.IntN(3) == 0 {
		nf.delays--
		nf.delayed.Add(1)
		sleep = time.Duration(rand.Int64N(int64(nf.maxDelay)) + 1)
	}
	f := nf.endTxn
	if key != int16(kmsg.EndTxn) || f == nil {
		return sleep
	}
	req := kmsg.NewPtrEndTxnRequest()
	req.SetVersion(version)
	body, ok := requestBody(frame, req.IsFlexible())
	if !ok || req.ReadFrom(body) != nil {
		return sleep
	}
	first := f.txnID == ""
	switch {
	case first && req.Commit:
		f.txnID = req.TransactionalID
	case first || req.TransactionalID != f.txnID:
		return sleep
	}
	f.left--
	if f.left <= 0 {
		nf.endTxn = nil
	}
	c.mu.Lock()
	c.pending[corr] = pendingAnswer{version: version, fault: f, first: first}
	c.mu.Unlock()
	return sleep
}

// requestBody skips the request header: key, version, correlation id,
// client id, and the tagged fields of a flexible header.
func requestBody(frame []byte, flexible bool) ([]byte, bool) {
	off := 8
	n := int(int16(binary.BigEndian.Uint16(frame[off:])))
	off += 2
	if n > 0 {
		off += n
	}
	if flexible {
		tags, ok := uvarint(frame, &off)
		for ; ok && tags > 0; tags-- {
			if _, ok = uvarint(frame, &off); !ok {
				break
			}
			var size uint64
			if size, ok = uvarint(frame, &off); ok {
				off += int(size)
			}
		}
		if !ok {
			return nil, false
		}
	}
	if off > len(frame) {
		return nil, false
	}
	return frame[off:], true
}

func uvarint(b []byte, off *int) (uint64, bool) {
	if *off >= len(b) {
		return 0, false
	}
	v, n := binary.Uvarint(b[*off:])
	if n <= 0 {
		return 0, false
	}
	*off += n
	return v, true
}

func (c *faultyConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.wbuf = append(c.wbuf, p...)
	var out []byte
	lose := false
	for len(c.wbuf) >= 8 {
		size := int(binary.BigEndian.Uint32(c.wbuf))
		if len(c.wbuf) < 4+size {
			break
		}
		frame := c.wbuf[:4+size]
		corr := int32(binary.BigEndian.Uint32(frame[4:]))
		pa, tamper := c.pending[corr]
		if !tamper {
			out = append(out, frame...)
			c.wbuf = c.wbuf[4+size:]
			continue
		}
		delete(c.pending, corr)
		resp := kmsg.NewPtrEndTxnResponse()
		resp.SetVersion(pa.version)
		hdr := 8
		if resp.IsFlexible() {
			hdr++ // no tagged fields in kfake's answers
		}
		parsed := resp.ReadFrom(frame[hdr:]) == nil
		if pa.first {
			pa.fault.once.Do(func() { pa.fault.applied <- parsed && resp.ErrorCode == 0 })
		}
		if pa.fault.reply == nil || !parsed {
			c.nf.lost.Add(1)
			lose = true
			c.wbuf = nil
			break
		}
		resp.ErrorCode = pa.fault.reply.Code
		c.nf.rewritten.Add(1)
		rewritten := binary.BigEndian.AppendUint32(nil, 0)
		rewritten = append(rewritten, frame[4:hdr]...)
		rewritten = resp.AppendTo(rewritten)
		binary.BigEndian.PutUint32(rewritten, uint32(len(rewritten)-4))
		out = append(out, rewritten...)
		c.wbuf = c.wbuf[4+size:]
	}
	c.mu.Unlock()
	if len(out) > 0 {
		if _, err := c.Conn.Write(out); err != nil {
			return 0, err
		}
	}
	if lose {
		c.Conn.Close()
	}
	return len(p), nil
}
