# Users, roles, permissions and authentication replayed against etcd 3.4 and concord.
etcdctl user add root:rootpw
etcdctl user add root:other
etcdctl role add ''
etcdctl user get nobody
etcdctl role get nobody
etcdctl user add plain --no-password
etcdctl user grant-role root nosuch
etcdctl auth enable
etcdctl user grant-role root nosuch
etcdctl auth enable
etcdctl auth enable
etcdctl put a b
etcdctl get a
etcdctl --user root:bad get a
etcdctl --user nobody:x get a
etcdctl --user plain:x get a
etcdctl --user root:rootpw put a b
etcdctl --user root:rootpw role add r1
etcdctl --user root:rootpw role add r1
etcdctl --user root:rootpw role grant-permission r1 readwrite foo
etcdctl --user root:rootpw role grant-permission r1 read --prefix pre/
etcdctl --user root:rootpw role grant-permission r1 write k1 k5
etcdctl --user root:rootpw role grant-permission r1 read --from-key z
etcdctl --user root:rootpw role grant-permission r1 write foo
etcdctl --user root:rootpw role grant-permission nosuch read x
etcdctl --user root:rootpw role get r1
etcdctl --user root:rootpw role get r1 -w json
etcdctl --user root:rootpw role get root
etcdctl --user root:rootpw user add u1:p1
etcdctl --user root:rootpw user grant-role u1 r1
etcdctl --user root:rootpw user grant-role u1 r1
etcdctl --user root:rootpw user grant-role u1 nosuch
etcdctl --user root:rootpw user get u1
etcdctl --user root:rootpw user get u1 --detail
etcdctl --user root:rootpw user get u1 -w json
etcdctl --user root:rootpw user list
etcdctl --user root:rootpw role list
etcdctl --user u1:p1 put foo 1
etcdctl --user u1:p1 get foo
etcdctl --user u1:p1 put bar 1
etcdctl --user u1:p1 get bar
etcdctl --user u1:p1 get pre/x
etcdctl --user u1:p1 get pre/ --prefix
etcdctl --user u1:p1 get pre --prefix
etcdctl --user u1:p1 put pre/x 1
etcdctl --user u1:p1 put k3 1
etcdctl --user u1:p1 get k3
etcdctl --user u1:p1 del k1 k5
etcdctl --user u1:p1 del k1 k6
etcdctl --user u1:p1 put k3 1 --prev-kv
etcdctl --user u1:p1 get zz
etcdctl --user u1:p1 get z --from-key
etcdctl --user u1:p1 get y --from-key
printf 'value("foo") = "1"\n\nput foo 2\n\nput bar 2\n\n' | etcdctl --user u1:p1 txn
printf 'value("foo") = "1"\n\nput foo 2\n\nput k2 2\n\n' | etcdctl --user u1:p1 txn
printf 'value("bar") = "1"\n\nput foo 2\n\n\n' | etcdctl --user u1:p1 txn
timeout 2 etcdctl --user u1:p1 watch bar
timeout 2 etcdctl --user u1:p1 watch pre/ --prefix
etcdctl --user root:rootpw lease grant 100 | awk '{print $2}' > $GOLDEN_TMP/lease; echo granted
etcdctl --user root:rootpw put bar v --lease=$(cat $GOLDEN_TMP/lease)
etcdctl --user u1:p1 lease revoke $(cat $GOLDEN_TMP/lease)
etcdctl --user u1:p1 lease timetolive $(cat $GOLDEN_TMP/lease) | wc -l
timeout 3 etcdctl --user u1:p1 lock mylock echo held
etcdctl --user root:rootpw role grant-permission r1 readwrite --prefix lk/
timeout 3 etcdctl --user u1:p1 lock lk echo held
timeout 3 etcdctl --user u1:p1 elect lk cand1 & sleep 1; timeout 2 etcdctl --user u1:p1 elect -l lk; wait
etcdctl --user u1:p1 user list
etcdctl --user u1:p1 user get u1
etcdctl --user u1:p1 user get root
etcdctl --user u1:p1 role get r1
etcdctl --user u1:p1 role get root
etcdctl --user u1:p1 user add u2:p2
etcdctl --user u1:p1 auth disable
etcdctl --user u1:p1 compact 2
etcdctl --user u1:p1 member list | wc -l
etcdctl --user u1:p1 endpoint status | wc -l
etcdctl --user u1:p1 lease grant 100 | wc -l
etcdctl --user root:rootpw role revoke-permission r1 foo
etcdctl --user root:rootpw role revoke-permission r1 foo
etcdctl --user root:rootpw role revoke-permission r1 k1 k5
etcdctl --user root:rootpw role revoke-permission nosuch k1
etcdctl --user root:rootpw role get r1
etcdctl --user u1:p1 put foo 3
echo p9 | etcdctl --user root:rootpw user passwd u1 --interactive=false
etcdctl --user u1:p9 get foo
etcdctl --user root:rootpw user revoke-role u1 r1
etcdctl --user root:rootpw user revoke-role u1 r1
etcdctl --user u1:p1 get foo
etcdctl --user root:rootpw user delete u1
etcdctl --user root:rootpw user delete u1
etcdctl --user root:rootpw role delete r1
etcdctl --user root:rootpw role delete r1
etcdctl --user root:rootpw user delete root
etcdctl --user root:rootpw user revoke-role root root
etcdctl --user root:rootpw auth disable
etcdctl get a
etcdctl user list
etcdctl role list
etcdctl auth disable
