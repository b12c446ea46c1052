# Watch, lease, lock and election session replayed against etcd 3.4 and concord.
# Background watchers write to $GOLDEN_TMP and are read back after the writes.
etcdctl put w/a 1
(timeout 4 etcdctl watch w/ --prefix --rev 5 > $GOLDEN_TMP/w1 2>&1 &) ; (timeout 4 etcdctl watch w/a --prev-kv --rev 5 > $GOLDEN_TMP/w2 2>&1 &) ; sleep 0.5
etcdctl put w/a 2
etcdctl put w/b 3
etcdctl del w/ --prefix
printf 'value("w/a") = "x"\n\nput w/a no\n\nput w/a yes\nput w/c yes\n\n' | etcdctl txn
sleep 4; cat $GOLDEN_TMP/w1; echo ---; cat $GOLDEN_TMP/w2
timeout 2 etcdctl watch w/ --prefix --rev 1
timeout 2 etcdctl watch w/a --rev 2 -w json | head -c 0
timeout 2 etcdctl watch w/c --rev 3 --prev-kv
timeout 2 etcdctl watch w/ --prefix --rev 4
etcdctl compact 5
timeout 2 etcdctl watch w/ --prefix --rev 3
timeout 2 etcdctl watch w/ --prefix --rev 5
etcdctl lease grant 30
etcdctl lease grant 1
etcdctl lease revoke 1234
etcdctl lease timetolive 1234
etcdctl lease keep-alive --once 1234
etcdctl put nl v --lease=1234
etcdctl lease grant 60 | awk '{print $2}' > $GOLDEN_TMP/lease; echo granted
etcdctl put lk1 v --lease=$(cat $GOLDEN_TMP/lease)
etcdctl put lk2 v --lease=$(cat $GOLDEN_TMP/lease)
etcdctl lease timetolive $(cat $GOLDEN_TMP/lease) --keys
etcdctl lease keep-alive --once $(cat $GOLDEN_TMP/lease)
etcdctl get lk --prefix -w json
etcdctl lease revoke $(cat $GOLDEN_TMP/lease)
etcdctl get lk --prefix
etcdctl lease timetolive $(cat $GOLDEN_TMP/lease)
etcdctl lease grant 2 | awk '{print $2}' > $GOLDEN_TMP/short; echo granted
etcdctl put ek v --lease=$(cat $GOLDEN_TMP/short)
sleep 4; etcdctl get ek; etcdctl lease timetolive $(cat $GOLDEN_TMP/short)
etcdctl lock mylock -- sh -c 'echo holding $ETCD_LOCK_KEY'
etcdctl lock mylock --ttl 5 -- echo second holder
etcdctl get mylock --prefix
(timeout 4 etcdctl elect el -l > $GOLDEN_TMP/obs 2>&1 &) ; sleep 0.5
timeout 2 etcdctl elect el alice
sleep 3; cat $GOLDEN_TMP/obs
timeout 2 etcdctl elect el bob
