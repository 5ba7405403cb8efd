-- Version 6: a rejoin by external commit that the server has not accepted
-- yet. The group state is then the rejoin's, unconfirmed: nothing is sent
-- in it, and the rejoin is resumed on the next connection. `behind` is the
-- last epoch this device really reached in the group.
CREATE TABLE rejoins (
    group_id  BLOB PRIMARY KEY,
    behind    INTEGER NOT NULL
) WITHOUT ROWID;
