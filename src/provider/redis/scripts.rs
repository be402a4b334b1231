//! The Lua scripts: every write that must be atomic, or that reads what another command just
//! returned, runs as one script, so a batch costs one round trip and a retried batch lands once.
//!
//! Scripts touch keys derived from the namespace's status key prefix besides those passed in
//! `KEYS`: fine on a standalone server or one shard, not across a cluster's slots.

use std::cell::Cell;
use std::fmt::Display;
use std::io::Write as _;

use redis::{
    Connection, ConnectionLike as _, ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind,
};
use serde::Serialize;

/// What the scripts that look at streams and their groups share: a flat `XINFO` reply (field,
/// value, field, value …) as a table, and the order of entry ids.
const STREAMS: &str = r"
local function fields(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
-- Whether stream entry id `a` comes before `b` (`<ms>-<n>`, compared as numbers).
local function entry_before(a, b)
  local da, db = string.find(a, '-', 1, true), string.find(b, '-', 1, true)
  local am, bm = tonumber(string.sub(a, 1, da - 1)), tonumber(string.sub(b, 1, db - 1))
  return am < bm or (am == bm and tonumber(string.sub(a, da + 1)) < tonumber(string.sub(b, db + 1)))
end
-- Group `name` of stream `key`, as fields; nil when there is none.
local function group_info(key, name)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local f = fields(g)
    if f['name'] == name then return f end
  end
  return nil
end
";

/// Helpers every write script starts with: status flags of finished events, server time, counter
/// deltas (applied once at the end), and the expiry of finished statuses. KEYS[1..5]: stream,
/// counts, time index, expiry index, pending index.
///
/// An expiry member is `<c|f><entry id> <time key>`: whether the event completed or failed, and
/// enough to remove it from every index even after Redis expired its status hash. Adds to the two
/// sorted sets are gathered into one `ZADD` each at the end of a script.
const PRELUDE: &str = r"
local stream, counts, time, expiry, pending = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix = ARGV[1]
local delta = {}
local function add(field, n) delta[field] = (delta[field] or 0) + n end
local function flag(status)
  if status == 'completed' then return 'c' elseif status == 'failed' then return 'f' end
  return nil
end
local now_ms = nil
local function server_ms()
  if not now_ms then
    local t = redis.call('TIME')
    now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now_ms
end
-- Sorted-set writes gathered into one ZREM and one ZADD per set at the end of the script, since
-- every command a script runs costs more than the work it does. Adds are kept in order in two
-- arrays. Removals are applied first; a removal records how many adds came before it, and those
-- of the same member are dropped, so it cancels earlier adds and an add made after it still lands.
local function later(key) return {key = key, scores = {}, members = {}, n = 0, rem = {}, gone = {}} end
local function zadd_later(set, score, member)
  local n = set.n + 1
  set.n = n
  set.scores[n] = score
  set.members[n] = member
end
local function zrem(set, member)
  if not set.gone[member] then set.rem[#set.rem + 1] = member end
  set.gone[member] = set.n
end
-- Runs `cmd [key] <items>` over a list (no key when `key` is nil), at most 1000 items per
-- command (Lua's stack bounds unpack).
local function each_chunk(cmd, key, items)
  for i = 1, #items, 1000 do
    local j = math.min(i + 999, #items)
    if key then redis.call(cmd, key, unpack(items, i, j)) else redis.call(cmd, unpack(items, i, j)) end
  end
end
local function zflush(set)
  each_chunk('ZREM', set.key, set.rem)
  local args, k, gone, scores, members = {}, 0, set.gone, set.scores, set.members
  for i = 1, set.n do
    local member = members[i]
    local cut = gone[member]
    if not cut or i > cut then
      args[k + 1] = scores[i]
      args[k + 2] = member
      k = k + 2
    end
  end
  each_chunk('ZADD', set.key, args)
end
local times, expiries = later(time), later(expiry)
-- Keeps the expiry of one event in step with its status: `old` and `new` are statuses.
local function reschedule(key, entry, tk, old_tk, old, new, ttl)
  local of, nf = flag(old), flag(new)
  if of then zrem(expiries, of .. entry .. ' ' .. old_tk) end
  if nf and ttl > 0 then
    redis.call('PEXPIRE', key, ttl)
    zadd_later(expiries, server_ms() + ttl, nf .. entry .. ' ' .. tk)
  elseif of then
    redis.call('PERSIST', key)
  end
end
-- Removes a stored event from the indexes when its record goes: `status` is its last status.
local function forget(entry, tk, status)
  zrem(times, tk)
  local f = flag(status)
  if f then zrem(expiries, f .. entry .. ' ' .. tk) end
  add(status, -1)
  add('total', -1)
end
-- The two parts of `<a> <b>`: an order-list element (entry, event id) or a pending record (entry,
-- time key).
local function halves(s)
  local sp = string.find(s, ' ', 1, true)
  return string.sub(s, 1, sp - 1), string.sub(s, sp + 1)
end
-- The pending records of `list` (event ids), by position (false where none).
local function pending_records(list)
  local out = {}
  for i = 1, #list, 1000 do
    local got = redis.call('HMGET', pending, unpack(list, i, math.min(i + 999, #list)))
    for j = 1, #got do out[i + j - 1] = got[j] end
  end
  return out
end
-- The time key of expiry member `m`.
local function expiry_time_key(m)
  return string.sub(m, string.find(m, ' ', 2, true) + 1)
end
-- Removes one finished event whose status expired (expiry member `m`), with exact bookkeeping.
-- `p` is the event id's pending record, if any: when Redis expired the hash first, the id may
-- have been stored again since, as a new event whose record holds the time key now.
local function purge_one(m, p)
  local tk = expiry_time_key(m)
  local entry = string.sub(m, 2, #m - #tk - 1)
  local key = prefix .. string.sub(tk, 23)
  local h = redis.call('HMGET', key, 'entry', 'time')
  local live_tk = h[2]
  if not h[1] and p then live_tk = select(2, halves(p)) end
  if h[1] == entry then
    redis.call('DEL', key)
    zrem(times, tk)
  elseif live_tk ~= tk then
    zrem(times, tk)
  end
  zrem(expiries, m)
  if string.sub(m, 1, 1) == 'c' then add('completed', -1) else add('failed', -1) end
  add('total', -1)
  add('expired', 1)
end
-- Removes up to `limit` finished events whose status expired; true when `limit` were due (more
-- may be).
local function purge(limit)
  local due = redis.call('ZRANGEBYSCORE', expiry, '-inf', server_ms(), 'LIMIT', 0, limit)
  -- Members this script already removed (a trimmed or deleted event) are not counted again.
  local todo, ids = {}, {}
  for _, m in ipairs(due) do
    if not expiries.gone[m] then
      todo[#todo + 1] = m
      ids[#ids + 1] = string.sub(expiry_time_key(m), 23)
    end
  end
  local records = pending_records(ids)
  for j, m in ipairs(todo) do purge_one(m, records[j]) end
  return #due == limit
end
-- Applies what the script gathered: index adds and counter deltas.
local function finish()
  zflush(times)
  zflush(expiries)
  for field, n in pairs(delta) do
    if n ~= 0 then redis.call('HINCRBY', counts, field, n) end
  end
end
";

/// `store_batch`. KEYS[6]: the order list. ARGV: status key prefix, `max_len` (0: none), trim
/// slack, trim chunk, ttl ms (0: none), origin ('' for none), then per event: id, JSON, type,
/// source, status, instance id, time key. Returns how many ids were new.
///
/// A new pending event gets no status hash: its record is a field of the pending index,
/// `<entry> <time key>`, written with the batch's others in one `HSET`. Any other new event, and
/// every re-store, gets a status hash.
const STORE: &str = r"
local order = KEYS[6]
local max_len, slack, chunk, ttl, origin =
  tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
-- Which ids are stored: one EXISTS over their status hashes and one HMGET of the pending index.
-- When none is (the usual case), no event needs its own lookup.
local ids, keys = {}, {}
for i = 7, #ARGV, 7 do
  ids[#ids + 1] = ARGV[i]
  keys[#keys + 1] = prefix .. ARGV[i]
end
local hashed = 0
for i = 1, #keys, 1000 do hashed = hashed + redis.call('EXISTS', unpack(keys, i, math.min(i + 999, #keys))) end
-- `pend`: the pending records of this batch's ids, stored before it or by it.
local pend = {}
for n, record in ipairs(pending_records(ids)) do
  if record then pend[ids[n]] = record end
end
-- The ids this batch adds to the pending index, in order; `added[id]` while still to be written.
local added_ids, added = {}, {}
local appended = {}
local next_id = '*'
local fresh = 0
local seen = {}
for i = 7, #ARGV, 7 do
  local n = (i - 7) / 7 + 1
  local id, st, tk = ids[n], ARGV[i + 4], ARGV[i + 6]
  local key = keys[n]
  local entry, old_st, old_tk = false, nil, nil
  local p = pend[id]
  if p then
    entry, old_tk = halves(p)
    old_st = 'pending'
  elseif hashed > 0 or seen[id] then
    local h = redis.call('HMGET', key, 'entry', 'status', 'time')
    entry, old_st, old_tk = h[1], h[2], h[3]
  end
  seen[id] = true
  if entry then
    -- A re-store: the body is replaced in the status hash (made now for a pending record); the
    -- entry, its sequence number and its origin stay.
    if p then
      pend[id] = nil
      if added[id] then added[id] = nil else redis.call('HDEL', pending, id) end
      redis.call('HSET', key, 'entry', entry, 'event', ARGV[i + 1], 'status', st, 'time', tk)
    else
      redis.call('HSET', key, 'event', ARGV[i + 1], 'status', st, 'time', tk)
      redis.call('HDEL', key, 'error', 'retry_count', 'processed_at', 'completed_at')
    end
    if old_tk ~= tk then
      zrem(times, old_tk)
      zadd_later(times, 0, tk)
    end
    reschedule(key, entry, tk, old_tk, old_st, st, ttl)
    if old_st ~= st then add(old_st, -1) add(st, 1) end
    add('replaced', 1)
  else
    if origin == '' then
      entry = redis.call('XADD', stream, next_id, 'event', ARGV[i + 1], 'id', id, 'type', ARGV[i + 2],
        'source', ARGV[i + 3], 'status', st, 'instance_id', ARGV[i + 5])
    else
      entry = redis.call('XADD', stream, next_id, 'event', ARGV[i + 1], 'id', id, 'type', ARGV[i + 2],
        'source', ARGV[i + 3], 'status', st, 'instance_id', ARGV[i + 5], 'origin', origin)
    end
    -- Keeps the sequence part of entry ids below 2^19, so every id maps to a sequence number. Only
    -- an id `<ms>-<n>` whose n has six digits or more (no dash in its last six characters) is
    -- parsed.
    next_id = '*'
    if not string.find(entry, '-', -6, true) then
      local dash = string.find(entry, '-', 1, true)
      if tonumber(string.sub(entry, dash + 1)) >= 524288 then
        next_id = string.format('%.0f', tonumber(string.sub(entry, 1, dash - 1)) + 1) .. '-0'
      end
    end
    if st == 'pending' then
      pend[id] = entry .. ' ' .. tk
      added[id] = true
      added_ids[#added_ids + 1] = id
    else
      redis.call('HSET', key, 'entry', entry, 'status', st, 'time', tk)
      reschedule(key, entry, tk, tk, nil, st, ttl)
    end
    if max_len > 0 then appended[#appended + 1] = entry .. ' ' .. id end
    zadd_later(times, 0, tk)
    add(st, 1)
    add('total', 1)
    fresh = fresh + 1
  end
end
local fields = {}
for _, id in ipairs(added_ids) do
  if added[id] then
    fields[#fields + 1] = id
    fields[#fields + 1] = pend[id]
  end
end
each_chunk('HSET', pending, fields)
each_chunk('RPUSH', order, appended)
-- Removes the events of the stream entries `entries` (ids in `ids`, by position) from every index,
-- counted as trimmed: those whose record still names that entry.
local function forget_entries(entries, ids)
  -- Pending records are read for all at once; an event with a status hash is read on its own.
  local records = pending_records(ids)
  local doomed, unpended = {}, {}
  for j, old_id in ipairs(ids) do
    if records[j] then
      local entry, tk = halves(records[j])
      if entry == entries[j] then
        unpended[#unpended + 1] = old_id
        forget(entry, tk, 'pending')
      end
    else
      local key = prefix .. old_id
      local h = redis.call('HMGET', key, 'entry', 'status', 'time')
      if h[1] == entries[j] then
        doomed[#doomed + 1] = key
        forget(h[1], h[3], h[2])
      end
    end
  end
  add('trimmed', #doomed + #unpended)
  each_chunk('DEL', nil, doomed)
  each_chunk('HDEL', pending, unpended)
end
-- Approximate MAXLEN with exact bookkeeping: once the stream is `slack` entries past max_len,
-- remove the oldest (up to `chunk`), and the events they hold from every index. The order list
-- names them without reading their bodies; entries older than any it names (another writer's, or
-- a stream older than the list) are read from the stream itself.
if max_len > 0 then
  local head = redis.call('LINDEX', order, 0)
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  if head and not (first and not entry_before(halves(head), first[1])) then
    -- The list names entries older than the stream's first: another writer trimmed them (the
    -- seed's `XADD … MAXLEN ~`), or deleted the stream. Their events go with them, though the
    -- stream may never reach max_len.
    local gone_entries, gone_ids = {}, {}
    for _, o in ipairs(redis.call('LRANGE', order, 0, chunk - 1)) do
      local entry, id = halves(o)
      if first and not entry_before(entry, first[1]) then break end
      gone_entries[#gone_entries + 1], gone_ids[#gone_ids + 1] = entry, id
    end
    redis.call('LTRIM', order, #gone_entries, -1)
    forget_entries(gone_entries, gone_ids)
    head = redis.call('LINDEX', order, 0)
  end
  local excess = redis.call('XLEN', stream) - max_len
  if excess > slack then
    local n = math.min(excess, chunk)
    local old_entries, old_ids, cut = {}, {}, nil
    local head_entry = head and (halves(head))
    if head and first and not entry_before(first[1], head_entry) then
      -- The list names the oldest entries, and perhaps some already deleted: those take nothing
      -- from the stream, so names are taken until `n` entries went (at most 2 × chunk names, a
      -- bound on the call; more deleted names than that leave the rest to the next store).
      local removed, taken = 0, 0
      while removed < n and taken < 2 * chunk do
        local named = redis.call('LRANGE', order, 0, math.min(n - removed, 2 * chunk - taken) - 1)
        if #named == 0 then break end
        local entries, ids = {}, {}
        for j, o in ipairs(named) do entries[j], ids[j] = halves(o) end
        redis.call('LTRIM', order, #named, -1)
        taken = taken + #named
        forget_entries(entries, ids)
        -- Exactly the entries named: others among them (written by a provider that keeps the
        -- whole stream, `max_len` 0) are left for a later call to read, once they are the oldest.
        for k = 1, #entries, 1000 do
          removed = removed + redis.call('XDEL', stream, unpack(entries, k, math.min(k + 999, #entries)))
        end
      end
    else
      -- Entries older than any the list names: read them from the stream.
      local upto = head and ('(' .. head_entry) or '+'
      for _, e in ipairs(redis.call('XRANGE', stream, '-', upto, 'COUNT', n)) do
        local f = e[2]
        for j = 1, #f, 2 do
          if f[j] == 'id' then
            old_entries[#old_entries + 1], old_ids[#old_ids + 1] = e[1], f[j + 1]
            break
          end
        end
        cut = e[1]
      end
    end
    forget_entries(old_entries, old_ids)
    if cut then
      -- Everything up to and including `cut` goes: every entry read.
      local dash = string.find(cut, '-', 1, true)
      local min_id = string.sub(cut, 1, dash - 1) .. '-' ..
        string.format('%.0f', tonumber(string.sub(cut, dash + 1)) + 1)
      redis.call('XTRIM', stream, 'MINID', min_id)
    end
  end
end
purge(256)
finish()
return fresh
";

/// `update_status_batch`. ARGV: status key prefix, ttl ms (0: none), then per update: id, status,
/// error, retry count, `processed_at`, `completed_at` ('' keeps the stored value). An event's
/// first status change moves its record from the pending index to a status hash.
const UPDATE: &str = r"
local ttl = tonumber(ARGV[2])
local unpended = {}
for i = 3, #ARGV, 6 do
  local id, st, err, retries, processed, completed =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local key = prefix .. id
  local h = redis.call('HMGET', key, 'entry', 'status', 'time')
  local entry, old, tk = h[1], h[2], h[3]
  if entry then
    if processed == '' and completed == '' then
      redis.call('HSET', key, 'status', st, 'error', err, 'retry_count', retries)
    elseif processed == '' then
      redis.call('HSET', key, 'status', st, 'error', err, 'retry_count', retries, 'completed_at', completed)
    elseif completed == '' then
      redis.call('HSET', key, 'status', st, 'error', err, 'retry_count', retries, 'processed_at', processed)
    else
      redis.call('HSET', key, 'status', st, 'error', err, 'retry_count', retries,
        'processed_at', processed, 'completed_at', completed)
    end
  else
    local p = redis.call('HGET', pending, id)
    if p then
      entry, tk = halves(p)
      old = 'pending'
      unpended[#unpended + 1] = id
      local args = {key, 'entry', entry, 'time', tk, 'status', st, 'error', err, 'retry_count', retries}
      if processed ~= '' then
        args[#args + 1] = 'processed_at'
        args[#args + 1] = processed
      end
      if completed ~= '' then
        args[#args + 1] = 'completed_at'
        args[#args + 1] = completed
      end
      redis.call('HSET', unpack(args))
    end
  end
  if entry then
    if old ~= st then
      reschedule(key, entry, tk, tk, old, st, ttl)
      add(old, -1)
      add(st, 1)
    elseif flag(st) then
      reschedule(key, entry, tk, tk, old, st, ttl)
    end
  end
end
each_chunk('HDEL', pending, unpended)
purge(256)
finish()
return 0
";

/// `delete`. ARGV: status key prefix, event id. Returns 1 when the event was stored.
///
/// Redis counts the entry in the stream's `entries-added` for good, but a group that had not read
/// it never reads it now, and its `entries-read` would fall one short once it reads past the gap:
/// the read script would count the entry lost. Each such group is credited it here, one
/// `XGROUP SETID … ENTRIESREAD` each (a group whose counter Redis does not know needs none: Redis
/// sets it from `entries-added` later).
const DELETE: &str = r"
local id = ARGV[2]
local key = prefix .. id
local h = redis.call('HMGET', key, 'entry', 'status', 'time')
if h[1] then
  redis.call('DEL', key)
else
  local p = redis.call('HGET', pending, id)
  if not p then return 0 end
  local entry, tk = halves(p)
  h = {entry, 'pending', tk}
  redis.call('HDEL', pending, id)
end
if redis.call('XDEL', stream, h[1]) == 1 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local f = fields(g)
    local last, read = f['last-delivered-id'], f['entries-read']
    if type(read) == 'number' and entry_before(last, h[1]) then
      redis.call('XGROUP', 'SETID', stream, f['name'], last, 'ENTRIESREAD', read + 1)
    end
  end
end
forget(h[1], h[3], h[2])
finish()
return 1
";

/// `stats`: purges up to ARGV[2] events that expired, then returns the counters, the stream's
/// length, the number of dead letters (KEYS[6]) and 1 when more may have expired (0 otherwise).
const STATS: &str = r"
local more = purge(tonumber(ARGV[2]))
finish()
return {redis.call('HGETALL', counts), redis.call('XLEN', stream), redis.call('HLEN', KEYS[6]),
  more and 1 or 0}
";

/// The record of one event, for the read scripts: its status hash, or for a pending event without
/// one, `{'entry', <entry id>}` from the pending index (the body's own status is then the
/// event's); `nil` when not stored. `prefix`: status key prefix; `pending`: the pending index.
const RECORD: &str = r"
local function record(prefix, pending, id)
  local h = redis.call('HGETALL', prefix .. id)
  if #h > 0 then return h end
  local p = redis.call('HGET', pending, id)
  if not p then return nil end
  return {'entry', string.sub(p, 1, string.find(p, ' ', 1, true) - 1)}
end
-- The entry id of record `h`, and whether a re-store put the body in it.
local function entry_of(h)
  local entry, replaced = nil, false
  for j = 1, #h, 2 do
    if h[j] == 'entry' then entry = h[j + 1] elseif h[j] == 'event' then replaced = true end
  end
  return entry, replaced
end
";

/// Reads one event's record and, unless a re-store put the body in its hash, its stream entry.
/// KEYS: stream, pending index; ARGV: status key prefix, event id. `false` when not stored.
const GET: &str = r"
local h = record(ARGV[1], KEYS[2], ARGV[2])
if not h then return false end
local entry, replaced = entry_of(h)
if replaced or not entry then return {h, {}} end
return {h, redis.call('XRANGE', KEYS[1], entry, entry)}
";

/// One page of `list`: up to ARGV[4] time keys in `[ARGV[2], ARGV[3]]` (BYLEX bounds) with their
/// records. KEYS: time index, stream, pending index; ARGV[1]: status key prefix. Returns the time
/// keys and, for each, its record and its stream entry (empty when the body is in the hash).
const LIST_PAGE: &str = r"
local keys = redis.call('ZRANGE', KEYS[1], ARGV[2], ARGV[3], 'BYLEX', 'LIMIT', 0, ARGV[4])
local records = {}
for i, tk in ipairs(keys) do
  local h = record(ARGV[1], KEYS[3], string.sub(tk, 23)) or {}
  local entry, replaced = entry_of(h)
  local e = {}
  if entry and not replaced then e = redis.call('XRANGE', KEYS[2], entry, entry) end
  records[i] = {h, e}
end
return {keys, records}
";

/// One page of `replay`: up to ARGV[3] stream entries from ARGV[2] (an XRANGE start), each with the
/// record of the event it holds. KEYS: stream, pending index; ARGV[1]: status key prefix.
const REPLAY_PAGE: &str = r"
local entries = redis.call('XRANGE', KEYS[1], ARGV[2], '+', 'COUNT', ARGV[3])
local out = {}
for i, e in ipairs(entries) do
  local h = {}
  local f = e[2]
  for j = 1, #f, 2 do
    if f[j] == 'id' then
      h = record(ARGV[1], KEYS[2], f[j + 1]) or {}
      break
    end
  end
  out[i] = {e[1], f, h}
end
return out
";

/// Where a replay from a time starts: the earliest stream entry that holds an event created at or
/// after it, found from the time index rather than by reading the stream. KEYS: time index, stream,
/// pending index; ARGV: status key prefix, BYLEX start of the time, most time keys to read, and the
/// entry id to start at no later than when there are more (the clock rule, see `replay_page`).
/// Returns an XRANGE start: the earliest entry of the events found; the stream's last entry when
/// none was created since (the scan then ends at once, past it); `-` for an empty stream.
const REPLAY_START: &str = r"
local keys = redis.call('ZRANGE', KEYS[1], ARGV[2], '+', 'BYLEX', 'LIMIT', 0, ARGV[3])
local start = nil
for _, tk in ipairs(keys) do
  local h = record(ARGV[1], KEYS[3], string.sub(tk, 23))
  -- An event whose status expired (not yet purged) has no record, and no replay returns it.
  local entry = h and entry_of(h)
  if entry and (not start or entry_before(entry, start)) then start = entry end
end
-- More events than were read: one not read may sit earlier in the stream (created out of order).
if #keys == tonumber(ARGV[3]) and (not start or entry_before(ARGV[4], start)) then start = ARGV[4] end
if start then return start end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
return last and last[1] or '-'
";

/// `store_dead_letters`. KEYS: letters, order index, counts; ARGV: most kept, then per letter: id,
/// order key, JSON. A letter is stored as `<order key> <JSON>`.
const DEAD_STORE: &str = r"
for i = 2, #ARGV, 3 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old then redis.call('ZREM', KEYS[2], string.sub(old, 1, string.find(old, ' ', 1, true) - 1)) end
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. ' ' .. ARGV[i + 2])
  redis.call('ZADD', KEYS[2], 0, ARGV[i + 1])
end
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[1])
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[2], over)
  for j = 1, #popped, 2 do redis.call('HDEL', KEYS[1], string.sub(popped[j], 23)) end
  redis.call('HINCRBY', KEYS[3], 'dead_letters_dropped', over)
end
return 0
";

/// `delete_dead_letter`. KEYS: letters, order index; ARGV: id. Returns 1 when it was stored.
const DEAD_DELETE: &str = r"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
redis.call('ZREM', KEYS[2], string.sub(old, 1, string.find(old, ' ', 1, true) - 1))
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
";

/// One page of dead letters: order keys in `[ARGV[1], ARGV[2]]` (BYLEX), at most ARGV[3], with
/// their stored values. KEYS: order index, letters.
const DEAD_PAGE: &str = r"
local keys = redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2], 'BYLEX', 'LIMIT', 0, ARGV[3])
if #keys == 0 then return {keys, {}} end
local args = {'HMGET', KEYS[2]}
for i, k in ipairs(keys) do args[i + 2] = string.sub(k, 23) end
return {keys, redis.call(unpack(args))}
";

/// Helpers of the claim scripts: the group's record of entries given back with a nak longer than
/// the claim idle time (KEYS[2], a sorted set: entry id scored by the server time in ms when it is
/// due again). Records that came due are dropped first, so the set holds only naks still running.
const NAKS: &str = r"
local naks = KEYS[2]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', naks, '-inf', now_ms)
local any_nak = redis.call('ZCARD', naks) > 0
-- How long until entry `id` is due again, in ms; nil when it is due.
local function not_due(id)
  if not any_nak then return nil end
  local due = redis.call('ZSCORE', naks, id)
  if due then return tonumber(due) - now_ms end
  return nil
end
";

/// Hands this member's own pending entries to it again (its predecessor's, or ones it gave back
/// with a nak), skipping any another member has claimed since, and any a nak holds back still (a
/// predecessor's nak longer than the claim idle time). KEYS: stream, naks; ARGV: group, consumer,
/// entry ids. Returns the number of entries found deleted, `{id, ms until due…}` of those held
/// back, then `{id, fields, deliveries}` per entry.
const CLAIM_OWN: &str = r"
local ids, counts, held = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}, {}, {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    local wait = not_due(ARGV[i])
    if wait then
      held[#held + 1] = ARGV[i]
      held[#held + 1] = wait
    else
      ids[#ids + 1] = ARGV[i]
      counts[ARGV[i]] = p[1][4]
    end
  end
end
if #ids == 5 then return {0, held} end
local claimed = redis.call(unpack(ids))
local out = {#ids - 5 - #claimed, held}
for _, e in ipairs(claimed) do out[#out + 1] = {e[1], e[2], counts[e[1]] + 1} end
return out
";

/// Takes over entries other members of the group left pending for at least ARGV[3] ms: scans the
/// pending list from cursor ARGV[4] (`-` or `(<id>`) over up to ARGV[5] entries, and claims up to
/// ARGV[6] that belong to someone else and that no nak holds back. (`XAUTOCLAIM` would also take
/// back this member's own idle entries, which a live member must not hand out to itself twice, and
/// those a nak holds back.) KEYS: stream, naks; ARGV[1..2]: group, consumer. Returns the next
/// cursor, the number of entries found deleted, then `{id, fields, deliveries}` per claimed entry.
const CLAIM_ABANDONED: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], ARGV[4], '+', ARGV[5])
local ids, counts = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3]}, {}
local max, cursor, stopped = tonumber(ARGV[6]), '-', false
for _, x in ipairs(p) do
  if #ids - 5 >= max then stopped = true break end
  cursor = '(' .. x[1]
  if x[2] ~= ARGV[2] and not not_due(x[1]) then
    ids[#ids + 1] = x[1]
    counts[x[1]] = x[4]
  end
end
if not stopped and #p < tonumber(ARGV[5]) then cursor = '-' end
if #ids == 5 then return {cursor, 0} end
local claimed = redis.call(unpack(ids))
local out = {cursor, #ids - 5 - #claimed}
for _, e in ipairs(claimed) do out[#out + 1] = {e[1], e[2], counts[e[1]] + 1} end
return out
";

/// Creates consumer group ARGV[1] on stream KEYS[1] (made if need be) after entry ARGV[2]: `$` (the
/// stream's end), or where a group that vanished had read to, unless the stream has never reached
/// that entry (a new stream on a server whose clock went back): then from its beginning. A group
/// that exists is kept as it is. Returns the group's last delivered entry id.
const CREATE_GROUP: &str = r"
local start = ARGV[2]
if start ~= '$' and redis.call('EXISTS', KEYS[1]) == 1
    and entry_before(fields(redis.call('XINFO', 'STREAM', KEYS[1]))['last-generated-id'], start) then
  start = '0'
end
-- A group made at the end is told how many entries the stream ever had (Redis 7.0 leaves its read
-- counter unknown), so `READ_NEW` can count what trimming takes from it before it reads.
local made
if start == '$' then
  local added = 0
  if redis.call('EXISTS', KEYS[1]) == 1 then
    added = fields(redis.call('XINFO', 'STREAM', KEYS[1]))['entries-added']
  end
  made = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], start, 'MKSTREAM', 'ENTRIESREAD', added)
else
  made = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], start, 'MKSTREAM')
end
if type(made) == 'table' and made.err and string.sub(made.err, 1, 9) ~= 'BUSYGROUP' then return made end
local group = group_info(KEYS[1], ARGV[1])
return group and group['last-delivered-id'] or '0-0'
";

/// Sets the idle time of entries this member still owns to ARGV[3] ms, without counting a
/// delivery: 0 is `extend`; `claim_idle - delay` is a nak no longer than the claim idle time
/// (another member may take the entry once the delay has passed). ARGV[4] is what happens to the
/// naks record (KEYS[2], see `NAKS`): empty leaves it, 0 drops the entries' records (an earlier
/// longer nak), and `d` > 0 records them as due in `d` ms: a nak longer than the claim idle time,
/// which Redis' idle times cannot express (`XCLAIM` takes no idle time below 0). KEYS: stream,
/// naks; ARGV: group, consumer, idle ms, record, entry ids.
const TOUCH: &str = r"
local args, owned = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}, {}
for i = 5, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    args[#args + 1] = ARGV[i]
    owned[#owned + 1] = ARGV[i]
  end
end
if #args == 5 then return 0 end
local n = #args - 5
if ARGV[4] == '0' then
  redis.call('ZREM', KEYS[2], unpack(owned))
elseif ARGV[4] ~= '' then
  local t = redis.call('TIME')
  local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[4])
  local scored = {}
  for j, id in ipairs(owned) do
    scored[2 * j - 1] = due
    scored[2 * j] = id
  end
  redis.call('ZADD', KEYS[2], unpack(scored))
end
args[#args + 1] = 'IDLE'
args[#args + 1] = ARGV[3]
args[#args + 1] = 'JUSTID'
redis.call(unpack(args))
return n
";

/// Reads up to ARGV[3] new entries for consumer ARGV[2] of group ARGV[1] (`XREADGROUP … >`, not
/// blocking), having first counted what the group lost: entries trimmed before it read them.
/// KEYS: stream, lost counts (a hash, group → entries lost). ARGV[4]: an entry the group is known
/// to have read up to (the member's last read), ARGV[5]: 1 to look even when that entry is in the
/// stream still. Returns the `XREADGROUP` reply (false for none) and the group's lost count.
///
/// Redis keeps, per stream, how many entries were ever added and, per group, how many it read
/// (`entries-read`, exact while nothing was deleted by id ahead of the group but by `delete`, which
/// credits the groups). Two moments tell how many the group will never read: when its
/// last-delivered id is before the stream's first entry (the ones before that first entry are
/// `entries-added - length`, while every deletion by id lies before it too), and when it has read
/// the last entry (`entries-added`). What the counter falls short of then is lost; it is counted
/// and the counter set right (`XGROUP SETID … ENTRIESREAD`), so the next look counts nothing twice.
const READ_NEW: &str = r"
local stream, group = KEYS[1], ARGV[1]
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
if (first and entry_before(ARGV[4], first[1])) or ARGV[5] == '1' then
  local g = group_info(stream, group) or {}
  local last, read = g['last-delivered-id'], g['entries-read']
  if last and type(read) == 'number' then
    local info = fields(redis.call('XINFO', 'STREAM', stream))
    local added, length = info['entries-added'], info['length']
    local deleted, newest = info['max-deleted-entry-id'], info['last-generated-id']
    local expected
    if first and entry_before(last, first[1]) and entry_before(deleted, first[1]) then
      expected = added - length
    elseif last == newest then
      expected = added
    end
    if expected and expected > read then
      redis.call('HINCRBY', KEYS[2], group, expected - read)
      redis.call('XGROUP', 'SETID', stream, group, last, 'ENTRIESREAD', expected)
    end
  end
end
local got = redis.call('XREADGROUP', 'GROUP', group, ARGV[2], 'COUNT', ARGV[3], 'STREAMS', stream, '>')
return {got, tonumber(redis.call('HGET', KEYS[2], group) or 0)}
";

/// Removes consumer ARGV[2] from group ARGV[1] of stream KEYS[1] when it holds no pending entry:
/// `XGROUP DELCONSUMER` drops the consumer's pending entries with it, so the check and the removal
/// must be one step. Returns 1 when it was removed, 0 when it holds entries (or the group is gone).
const DELETE_CONSUMER: &str = r"
-- A group that vanished (NOGROUP) has no consumer left to remove.
local held = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if held.err or #held > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) >= 0 and 1 or 0
";

/// Removes up to ARGV[4] consumers of group ARGV[1] of stream KEYS[1], other than ARGV[2], that hold
/// no pending entry and were handed nothing for at least ARGV[3] ms: members that are gone. (One
/// still alive loses nothing, holding nothing; its next read adds it again.) Returns how many went.
const SWEEP_CONSUMERS: &str = r"
local min_idle, max, gone = tonumber(ARGV[3]), tonumber(ARGV[4]), 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  if gone >= max then break end
  local f = fields(c)
  local name = f['name']
  if name ~= ARGV[2] and f['pending'] == 0 and f['idle'] >= min_idle then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    gone = gone + 1
  end
end
return gone
";

/// The provider's scripts, hashed once.
pub(super) struct Scripts {
    pub(super) store: Script,
    pub(super) update: Script,
    pub(super) delete: Script,
    pub(super) stats: Script,
    pub(super) get: Script,
    pub(super) list_page: Script,
    pub(super) replay_page: Script,
    pub(super) replay_start: Script,
    pub(super) dead_store: Script,
    pub(super) dead_delete: Script,
    pub(super) dead_page: Script,
    pub(super) claim_own: Script,
    pub(super) claim_abandoned: Script,
    pub(super) touch: Script,
    pub(super) create_group: Script,
    pub(super) delete_consumer: Script,
    pub(super) read_new: Script,
    pub(super) sweep_consumers: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let with_prelude = |body: &str| Script::new(&format!("{STREAMS}{PRELUDE}{body}"));
        let with_streams = |body: &str| Script::new(&format!("{STREAMS}{body}"));
        let with_record = |body: &str| Script::new(&format!("{RECORD}{body}"));
        Self {
            store: with_prelude(STORE),
            update: with_prelude(UPDATE),
            delete: with_prelude(DELETE),
            stats: with_prelude(STATS),
            get: with_record(GET),
            list_page: with_record(LIST_PAGE),
            replay_page: with_record(REPLAY_PAGE),
            replay_start: Script::new(&format!("{STREAMS}{RECORD}{REPLAY_START}")),
            dead_store: Script::new(DEAD_STORE),
            dead_delete: Script::new(DEAD_DELETE),
            dead_page: Script::new(DEAD_PAGE),
            claim_own: Script::new(&format!("{NAKS}{CLAIM_OWN}")),
            claim_abandoned: Script::new(&format!("{NAKS}{CLAIM_ABANDONED}")),
            touch: Script::new(TOUCH),
            create_group: with_streams(CREATE_GROUP),
            delete_consumer: Script::new(DELETE_CONSUMER),
            read_new: with_streams(READ_NEW),
            sweep_consumers: with_streams(SWEEP_CONSUMERS),
        }
    }
}

/// One call of a script, written in the protocol's own form (`EVALSHA <hash> <key count> <keys>
/// <args>` as RESP) straight into a buffer its thread reuses: each argument is copied once, values
/// are formatted and serialized in place, and once the thread's buffer has grown to its calls'
/// size, a batch of a thousand events costs no allocation. A server that does not know the script
/// (a restarted Redis) gets it loaded and the call sent again.
pub(super) struct Call<'a> {
    script: &'a Script,
    /// `HEADER` bytes of room for the argument count, then the arguments.
    buf: Vec<u8>,
    /// Where a value is formatted before it is written as an argument (its length goes first).
    scratch: Vec<u8>,
    args: usize,
}

/// Room at the start of a call's buffer for `*<argument count>\r\n`.
const HEADER: usize = 24;
/// Buffers larger than this are dropped after a call rather than kept for the thread's next one,
/// so a rare huge batch does not pin its memory to every thread that ever wrote one.
const KEEP_BUFFER: usize = 4 << 20;

thread_local! {
    static BUFFERS: Cell<(Vec<u8>, Vec<u8>)> = const { Cell::new((Vec::new(), Vec::new())) };
}

impl<'a> Call<'a> {
    pub(super) fn new(script: &'a Script, keys: &[&str]) -> Self {
        let (mut buf, mut scratch) = BUFFERS.take();
        buf.clear();
        buf.resize(HEADER, 0);
        scratch.clear();
        let mut call = Self { script, buf, scratch, args: 0 };
        call.arg("EVALSHA").arg(script.get_hash()).arg(keys.len());
        for key in keys {
            call.arg(key);
        }
        call
    }

    /// An argument written as `value` displays itself (a string as it is).
    pub(super) fn arg(&mut self, value: impl Display) -> &mut Self {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        // Writing to a Vec cannot fail.
        let _ = write!(scratch, "{value}");
        self.push(&scratch);
        self.scratch = scratch;
        self
    }

    /// An argument holding `value` as compact JSON.
    pub(super) fn arg_json(&mut self, value: &impl Serialize) -> &mut Self {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        serde_json::to_writer(&mut scratch, value)
            .expect("the values the scripts take always serialize: their map keys are strings");
        self.push(&scratch);
        self.scratch = scratch;
        self
    }

    fn push(&mut self, arg: &[u8]) {
        let _ = write!(self.buf, "${}\r\n", arg.len());
        self.buf.extend_from_slice(arg);
        self.buf.extend_from_slice(b"\r\n");
        self.args += 1;
    }

    pub(super) fn invoke<T: FromRedisValue>(&mut self, conn: &mut Connection) -> RedisResult<T> {
        let count = format!("*{}\r\n", self.args);
        let start = HEADER - count.len();
        self.buf[start..HEADER].copy_from_slice(count.as_bytes());
        let command = &self.buf[start..];
        let reply = match conn.req_packed_command(command)?.extract_error() {
            Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.script.prepare_invoke().load(conn)?;
                conn.req_packed_command(command)?.extract_error()?
            }
            reply => reply?,
        };
        Ok(redis::from_redis_value(reply)?)
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        let keep =
            |buf: &mut Vec<u8>| if buf.capacity() <= KEEP_BUFFER { std::mem::take(buf) } else { Vec::new() };
        BUFFERS.set((keep(&mut self.buf), keep(&mut self.scratch)));
    }
}
