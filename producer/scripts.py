"""Lua scripts that change a job's keys: each runs atomically inside Redis.

A job's keys share its hash tag (one Cluster slot); CLAIM, RENEW and FINISH also
touch the running index, one key for all jobs. The terminal write (``done`` entry + record)
is one function used by every path that can end a job, which is what makes
"exactly one ending" hold whatever the races.

KEYS are always: job hash, events stream, lease, cancel flag; CLAIM and FINISH
also take the running index (``running_job_keys``), so a claimed job is indexed
for the sweeper in the same step that leases it, and leaves the index as it ends.
"""

from __future__ import annotations

__all__ = [
    "CANCEL",
    "CLAIM",
    "CREATE",
    "FINISH",
    "IDEM_RELEASE",
    "PUBLISH",
    "RENEW",
    "REQUEUE",
    "REQUEUE_SENT",
    "UNQUEUE",
    "job_keys",
    "running_job_keys",
]

from .keys import RUNNING_INDEX, cancel_key, events_key, job_key, lease_key


def job_keys(job_id: str) -> list[str]:
    return [job_key(job_id), events_key(job_id), lease_key(job_id), cancel_key(job_id)]


def running_job_keys(job_id: str) -> list[str]:
    """The KEYS of CLAIM and FINISH: the job's four and the running index."""
    return [*job_keys(job_id), RUNNING_INDEX]


# finish(status, error, error_type, result_json, now, ttl, maxlen) -> done entry id
# An events key of another type (WRONGTYPE) gets no done entry, and the ending is
# recorded regardless (done_id ''): a job whose stream cannot end must still end.
_FINISH_FN = """
local TERMINAL = {succeeded=1, failed=1, cancelled=1, timed_out=1, limit_exceeded=1}
local function finish(status, err, err_type, result, now, ttl, maxlen)
  local attempt = redis.call('HGET', KEYS[1], 'attempt') or '0'
  local fields = {'type', 'done', 'status', status, 'attempt', attempt}
  if err ~= '' then
    table.insert(fields, 'error'); table.insert(fields, err)
  end
  local ok, id = pcall(redis.call, 'XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(fields))
  if not ok then
    local why = type(id) == 'table' and id.err or tostring(id)
    if not string.find(why, 'WRONGTYPE', 1, true) then error(id) end
    id = ''
  end
  redis.call('HSET', KEYS[1], 'status', status, 'error', err, 'error_type', err_type,
             'result', result, 'finished_at', now, 'done_id', id)
  redis.call('HDEL', KEYS[1], 'payload', 'usage')
  redis.call('DEL', KEYS[3])
  for i = 1, 2 do redis.call('EXPIRE', KEYS[i], ttl) end
  if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('EXPIRE', KEYS[4], ttl) end
  return id
end
-- Before the ending of a job whose last attempt was lost (it ends without running
-- again): that attempt's tokens, if any, match no record text (a snapshot holds
-- usage, not text), so they are voided and the stream's final text is the record's.
local function void_lost_attempt(maxlen)
  local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
  if attempt > 0 and redis.call('TYPE', KEYS[2]).ok == 'stream' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'type', 'reset', 'attempt', attempt,
               'reason', 'lost',
               'detail', 'attempt ' .. attempt .. ' did not finish (its worker was lost); its output is void')
  end
end
-- The result of a job ended without running again: what its lost attempts used, as
-- their last lease renewal saved it (finish reason 'error'), else ``default``.
local function carried(default, reason)
  local usage = redis.call('HGET', KEYS[1], 'usage')
  if not usage then return default end
  if reason == 'error' then return usage end
  return (string.gsub(usage, '"finish_reason":"error"', '"finish_reason":"' .. reason .. '"', 1))
end
"""

# ARGV: payload, actor, now, ttl -> 1 created, 0 exists
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'actor', ARGV[2], 'created_at', ARGV[3],
           'attempt', 0, 'payload', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# An idempotency key (its own slot, one key): ARGV job id -> 1 if it named that job and
# is now gone, else 0. Undoing a failed enqueue must not drop a key another caller took.
IDEM_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# ARGV: owner, status, error, error_type, result, now, ttl, maxlen, job_id
# -> {1, done_id} | {0, 'terminal'} | {0, 'fenced'} | {0, 'missing'}
# Unless fenced (the job is another attempt's, or the sweeper's), the job leaves the
# running index (KEYS[5]): it has ended, by this call or before it. The owner that
# wrote the ending is kept (ended_by), so a re-run of the call answers as the first.
FINISH = (
    _FINISH_FN
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status and not TERMINAL[status] and ARGV[1] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return {0, 'fenced'}
end
redis.call('ZREM', KEYS[5], ARGV[9])
if not status then return {0, 'missing'} end
if TERMINAL[status] then
  if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'ended_by') == ARGV[1] then
    return {1, redis.call('HGET', KEYS[1], 'done_id')}  -- this very call again: its reply was lost
  end
  return {0, 'terminal'}
end
local id = finish(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'ended_by', ARGV[1]) end
return {1, id}
"""
)

# ARGV: owner, lease_ms, now, max_attempts, worker, ttl, maxlen, cancelled_result, failed_result,
# queue (recorded so a sweeper sends the job back to the queue it came from),
# index_deadline (the lease's end, unix seconds), job_id
# -> {'claimed', attempt, payload, usage} | {'missing'} | {'terminal'} | {'busy'}
#    | {'exhausted'} | {'cancelled'} | {'unstreamable'}
# usage: what the job's lost attempts used (ActorResult JSON, saved by RENEW), or false.
# A claimed job enters the running index (KEYS[5]) in the same step, so there is no
# moment a worker could die holding a lease the sweeper can't find; the payload
# comes back with the claim, saving the attempt a round trip. A claim that ends the
# job itself (cancelled, exhausted) records its owner as ended_by, so a re-run of it
# (its reply lost) answers as the first run did.
CLAIM = (
    _FINISH_FN
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if TERMINAL[status] then
  -- This very claim ended the job, and its reply was lost: answer as it did.
  if redis.call('HGET', KEYS[1], 'ended_by') == ARGV[1] then
    if status == 'cancelled' then return {'cancelled', 0} end
    if redis.call('HGET', KEYS[1], 'error_type') == 'StreamWriteError' then
      return {'unstreamable', 0}
    end
    return {'exhausted', tonumber(redis.call('HGET', KEYS[1], 'attempt'))}
  end
  return {'terminal', 0}
end
-- Our own lease: this is a re-run of a claim whose reply was lost (the client
-- retried after a dropped connection). Answer as the first run did.
if redis.call('GET', KEYS[3]) == ARGV[1] then
  return {'claimed', tonumber(redis.call('HGET', KEYS[1], 'attempt')),
          redis.call('HGET', KEYS[1], 'payload'), redis.call('HGET', KEYS[1], 'usage')}
end
if redis.call('EXISTS', KEYS[3]) == 1 then return {'busy', 0} end
if redis.call('EXISTS', KEYS[4]) == 1 then
  local why = 'cancelled before it started'
  if tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') > 0 then
    why = 'cancelled by request (its last attempt was lost before it could stop)'
  end
  void_lost_attempt(ARGV[7])
  finish('cancelled', why, 'Cancelled', carried(ARGV[8], 'cancelled'), ARGV[3], ARGV[6], ARGV[7])
  redis.call('HSET', KEYS[1], 'ended_by', ARGV[1])
  return {'cancelled', 0}
end
-- An events key of another type can take no entry: the job ends here, failed, rather
-- than run an attempt whose every write fails (and be sent again for good).
local kind = redis.call('TYPE', KEYS[2]).ok
if kind ~= 'stream' and kind ~= 'none' then
  finish('failed', 'its events key ' .. KEYS[2] .. ' holds a ' .. kind .. ', not a stream',
         'StreamWriteError', carried(ARGV[9], 'error'), ARGV[3], ARGV[6], ARGV[7])
  redis.call('HSET', KEYS[1], 'ended_by', ARGV[1])
  return {'unstreamable', 0}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
if attempt > tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'attempt', attempt - 1)
  void_lost_attempt(ARGV[7])
  finish('failed', 'gave up after ' .. (attempt - 1) .. ' attempts: the worker running it was lost each time',
         'AttemptsExhausted', carried(ARGV[9], 'error'), ARGV[3], ARGV[6], ARGV[7])
  redis.call('HSET', KEYS[1], 'ended_by', ARGV[1])
  return {'exhausted', attempt - 1}
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('HDEL', KEYS[1], 'requeued_at')
if attempt > 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'type', 'reset', 'attempt', attempt,
             'reason', 'restart',
             'detail', 'attempt ' .. (attempt - 1) .. ' did not finish (its worker was lost); its output is void')
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'type', 'start', 'attempt', attempt,
           'worker', ARGV[5])
-- base: the stream's length as the attempt starts, from which PUBLISH counts its entries.
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[3], 'worker', ARGV[5],
           'queue', ARGV[10], 'base', redis.call('XLEN', KEYS[2]))
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[11], ARGV[12])
return {'claimed', attempt, redis.call('HGET', KEYS[1], 'payload'), redis.call('HGET', KEYS[1], 'usage')}
"""
)

# KEYS: events, lease, job of each job in turn. ARGV: maxlen, max_events, ttl, then
# for each job: owner, first_seq, verify, entries
# where entries is a JSON array of flat field/value arrays: one argument per batch
# (decoded by Redis's C cjson) instead of one per field keeps the client's cost per
# token low. One call carries the batches of many jobs: a script call costs Redis
# about as much as the XADD of a token, and under load most batches hold one token.
# Each job is checked and written on its own, as if it were called alone.
# Entries are numbered from first_seq; those this attempt has written already (a
# pipeline cut after Redis ran it) are skipped, so a batch sent again never doubles a
# token. Only a batch sent again (verify '1') counts them: they are the stream's
# entries past ``base``, its length when CLAIM started the attempt, as nothing else
# writes to the stream while an attempt holds the lease (nothing is stored per call:
# an HSET a call cost ~12% of the script's time, and AOF and replicas its bytes);
# otherwise the client knows it is first_seq - 1. A stream found gone starts anew
# at the batch (``base`` moves); one trimmed by another client would make a resend
# skip entries: don't.
# The cap is checked per entry: the stream never holds more than max_events
# entries written here, so MAXLEN (set above the cap) never trims a live stream.
# CLAIM made the stream and RENEW moves its TTL; a stream made here (it had expired
# or was deleted under a running job) gets the TTL now.
# A job whose write fails (a key of another type under its name) gets the error in
# its place; the others of the call are written regardless. Redis refusing writes for
# its own state (OOM, READONLY, MISCONF, NOREPLICAS) refuses every job of the call
# alike, and the client sends them all again.
# -> per job: number of entries added | -1 lease lost | -2 stream cap reached | error
PUBLISH = """
local maxlen, cap, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local function publish(events, lease, job, a)
  if redis.call('GET', lease) ~= ARGV[a] then return -1 end
  local len = redis.call('XLEN', events)
  local made = len == 0
  local seq = tonumber(ARGV[a + 1]) - 1
  local last = seq
  if made then
    -- The stream is gone (deleted or expired under the attempt): it starts anew with
    -- this batch, and a resend counts from here. The record keeps its TTL.
    if redis.call('EXISTS', job) == 1 then redis.call('HSET', job, 'base', -seq) end
  elseif ARGV[a + 2] == '1' then
    last = len - tonumber(redis.call('HGET', job, 'base') or '0')
  end
  local added = 0
  for _, fields in ipairs(cjson.decode(ARGV[a + 3])) do
    seq = seq + 1
    if seq > last then
      if len >= cap then return -2 end
      redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', unpack(fields))
      if made then redis.call('EXPIRE', events, ttl); made = false end
      len = len + 1
      added = added + 1
    end
  end
  return added
end
local out = {}
for j = 1, #KEYS / 3 do
  local ok, res = pcall(publish, KEYS[3 * j - 2], KEYS[3 * j - 1], KEYS[3 * j], 4 * j)
  if ok then
    out[j] = res
  else
    out[j] = {err = type(res) == 'table' and res.err or tostring(res)}
  end
end
return out
"""

# KEYS: lease, cancel, job, running index, events. ARGV: owner, lease_ms, ttl,
# index_deadline, job_id, usage -> {held, cancel_requested}
# usage (ActorResult JSON, or '' for none yet) is what the attempt and the job's lost
# attempts before it have used so far: a later attempt, or the claim that gives the
# job up, counts it if this attempt is lost too.
# The index entry is moved on only under the lease: a renewal that reaches Redis after
# the job's FINISH (which drops the lease and the entry) must not put it back. The
# stream's TTL moves with the record's: a run quiet for longer than the retention
# must not lose its stream's first entries.
RENEW = """
local held = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local record = redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('EXPIRE', KEYS[5], ARGV[3])
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[5])
  -- Into the record only: a record gone under a live lease is not made anew (without a TTL).
  if ARGV[6] ~= '' and record == 1 then redis.call('HSET', KEYS[3], 'usage', ARGV[6]) end
  held = 1
end
return {held, redis.call('EXISTS', KEYS[2])}
"""

# ARGV: now, ttl, maxlen, cancelled_result
# -> 'cancelled' (was queued) | 'requested' | 'already_requested' | 'finished' | 'missing'
CANCEL = (
    _FINISH_FN
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if TERMINAL[status] then return 'finished' end
if redis.call('EXISTS', KEYS[4]) == 1 then return 'already_requested' end
redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[2])
if status == 'queued' and redis.call('EXISTS', KEYS[3]) == 0 then
  -- Queued again after a lost attempt, or never started.
  void_lost_attempt(ARGV[3])
  finish('cancelled', 'cancelled before it started', 'Cancelled', carried(ARGV[4], 'cancelled'),
         ARGV[1], ARGV[2], ARGV[3])
  return 'cancelled'
end
return 'requested'
"""
)

# The sweeper's step for a job whose running-index entry is due. KEYS: the usual four
# and the running index. ARGV: now (unix s), resend_after_s, job_id.
# -> {1, queue, actor}: send its message | {0, '', ''}: an attempt holds its lease |
#    {-1, '', ''}: nothing to send (ended, not requeued, or another sweep is sending it)
# The index entry stays until the message is out (REQUEUE_SENT), moved resend_after_s
# ahead: a sweeper that dies or loses Redis between this and the send leaves the job
# to the next sweep, which sends it (a duplicate message runs nothing). A live lease
# moves a lagging entry to the lease's end (a worker whose clock runs behind renews
# into the past), so such entries can't crowd the lost jobs out of a sweep.
REQUEUE = """
local now = tonumber(ARGV[1])
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'running' then
  local held = redis.call('PTTL', KEYS[3])
  if held == -1 then return {0, '', ''} end
  if held > 0 then
    redis.call('ZADD', KEYS[5], now + held / 1000, ARGV[3])
    return {0, '', ''}
  end
  redis.call('HSET', KEYS[1], 'status', 'queued', 'requeued_at', ARGV[1])
elseif status == 'queued' and redis.call('HGET', KEYS[1], 'requeued_at') then
  local at = redis.call('HGET', KEYS[1], 'requeued_at')
  -- The same call again (its reply was lost), or a send that never happened: send it.
  if at ~= ARGV[1] and now - tonumber(at) < tonumber(ARGV[2]) then
    return {-1, '', ''}  -- another sweep requeued it just now and is sending it
  end
  redis.call('HSET', KEYS[1], 'requeued_at', ARGV[1])
else
  redis.call('ZREM', KEYS[5], ARGV[3])  -- ended, gone, or queued by its enqueue
  return {-1, '', ''}
end
redis.call('ZADD', KEYS[5], now + tonumber(ARGV[2]), ARGV[3])
return {1, redis.call('HGET', KEYS[1], 'queue') or '', redis.call('HGET', KEYS[1], 'actor') or ''}
"""

# The message of a REQUEUE is out. KEYS: the usual four and the running index. ARGV:
# that REQUEUE's now, job_id. The job leaves the index unless an attempt claimed it
# meanwhile (its claim indexed it anew) or a later REQUEUE owns the send.
REQUEUE_SENT = """
if redis.call('HGET', KEYS[1], 'status') == 'queued'
   and redis.call('HGET', KEYS[1], 'requeued_at') == ARGV[1] then
  redis.call('ZREM', KEYS[5], ARGV[2])
  return 1
end
return 0
"""

# Undo a REQUEUE whose message could not be sent (broker away), so the next sweep
# tries again. KEYS: the usual four. -> 1 restored | 0 the job moved on meanwhile
UNQUEUE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 or not redis.call('HGET', KEYS[1], 'requeued_at') then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'running')
redis.call('HDEL', KEYS[1], 'requeued_at')
return 1
"""
