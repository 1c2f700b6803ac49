package kafka

// LeaveGroup makes c's client leave its group while its handlers may still
// be running: the way a member becomes a zombie (kicked out after a pause,
// still holding records).
func LeaveGroup(c *Consumer) { c.cl.LeaveGroup() }
