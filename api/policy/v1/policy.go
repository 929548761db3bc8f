package policyv1

// TypeURL is the xDS type URL of the Policy resource.
const TypeURL = "type.googleapis.com/patchbay.policy.v1.Policy"

// ResourceName is the name of the single Policy resource the control plane serves.
const ResourceName = "patchbay"

// ExtprocUserAgent is the xDS node user_agent_name ext_proc instances present; the control
// plane serves them the Policy resource (and nothing else).
const ExtprocUserAgent = "patchbay-extproc"

// LayerSlots is the size of a layer's slot space (basis points of users).
const LayerSlots = 10000

// Hash is the salted 64-bit hash every patchbay component uses for assignment:
// FNV-1a over salt, a zero byte, then key, finished with the splitmix64 mixer so
// that every bit (and so any modulus) is well distributed. It is stable across
// processes, replicas, restarts and releases: changing it reshuffles every user.
// It does not allocate.
func Hash(salt, key string) uint64 {
	const (
		offset = 14695981039346656037
		prime  = 1099511628211
	)
	h := uint64(offset)
	for i := 0; i < len(salt); i++ {
		h ^= uint64(salt[i])
		h *= prime
	}
	h *= prime // the zero separator byte: h ^= 0 is a no-op
	for i := 0; i < len(key); i++ {
		h ^= uint64(key[i])
		h *= prime
	}
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	return h
}
